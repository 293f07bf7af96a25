"""A full-size SD 1.5 single file, compiled without a base and loaded, against diffusers' own
single-file load: the cold start we replace.

The checkpoint has the real LDM key layout, shapes and dtypes of a pruned fp16 SD 1.5 file
(tests/fixtures/model-keys/sd1-ldm.yaml, no EMA), ~2 GB of seeded random weights. Its family's
config repo (real full-size configs from compiler.family_configs, a small tokenizer) is served by
the loopback Hub, so the compile takes the path a user's does: detect, lock the config repo,
fetch configs, convert, save. Each step runs in its own process; peak memory is that process's
maximum RSS (getrusage).

    .venv/bin/python -m bench.single_file_sd15 [--workdir DIR] [--keep]

Prints one JSON object: compile seconds and peak RSS, artifact bytes, the runtime's load seconds
and peak RSS from the artifact, and diffusers' ``from_single_file`` load seconds and peak RSS
from the same file with the same configs (what a worker that converts at every cold start pays),
and their ratio. Needs the dev install (tests/ helpers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
LAYOUT = REPO / "tests" / "fixtures" / "model-keys" / "sd1-ldm.yaml"
ST = {"float16": ("F16", np.float16), "float32": ("F32", np.float32), "int64": ("I64", np.int64)}


def checkpoint_keys() -> dict[str, tuple[tuple[int, ...], str]]:
    """A pruned fp16 SD 1.5 file: every required key but the EMA copy; floats as fp16."""
    comps = yaml.safe_load(LAYOUT.read_text())["components"]
    keys = {}
    for comp, entries in comps.items():
        if comp == "ema":
            continue
        for k, v in entries.items():
            if not v.get("optional"):
                keys[k] = (tuple(v["shape"]), "float16" if v["dtype"] == "float32" else v["dtype"])
    return keys


def write_checkpoint(path: Path, seed: int = 1505) -> int:
    """Seeded random weights (N(0, 0.02), norms at 1), streamed tensor by tensor."""
    keys = checkpoint_keys()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k in sorted(keys):
        shape, dtype = keys[k]
        n = int(np.prod(shape)) * np.dtype(ST[dtype][1]).itemsize
        header[k] = {"dtype": ST[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for k in sorted(keys):
            shape, dtype = keys[k]
            if dtype == "int64":
                data = np.arange(int(np.prod(shape)), dtype=np.int64) % shape[-1]
            elif k.endswith(".weight") and len(shape) == 1:  # norm scales
                data = np.ones(shape, dtype=np.float16)
            else:
                data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            f.write(np.ascontiguousarray(data).tobytes())
    return 8 + len(raw) + offset


def run(cmd: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, stdout) of one child process; fails loudly. wait4 gives that
    child's own rusage (RUSAGE_CHILDREN would be the maximum over every child so far)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return seconds, usage.ru_maxrss * 1024, out.read()  # Linux reports kilobytes


# Each prints import seconds, then load seconds. Loads end by reading every weight page (a CPU
# load is an mmap that costs nothing until touched; a GPU load reads every byte to copy it).
TOUCH = """
def touch(pipe):
    for name, comp in pipe.components.items():
        for p in getattr(comp, "parameters", lambda: [])():
            p.detach().reshape(-1)[:: 2048].float().sum()
"""
LOAD_ARTIFACT = (
    """
import sys, time, pathlib
t0 = time.perf_counter()
import torch, diffusers
from diffusers import StableDiffusionPipeline  # the same imports as below: load times compare
from transformers import CLIPTextModel
from runtime.loader import load
t1 = time.perf_counter()
"""
    + TOUCH
    + """
touch(load(pathlib.Path(sys.argv[1]), device="cpu").pipeline)
print(t1 - t0, time.perf_counter() - t1)
"""
)
LOAD_SINGLE_FILE = (
    """
import sys, time
t0 = time.perf_counter()
import torch, diffusers
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel
t1 = time.perf_counter()
"""
    + TOUCH
    + """
touch(StableDiffusionPipeline.from_single_file(sys.argv[1], config=sys.argv[2], local_files_only=True,
                                               torch_dtype=torch.float16))
print(t1 - t0, time.perf_counter() - t1)
"""
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (2 GB checkpoint, 2 GB artifact)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from compiler.families import FAMILIES
    from tests.helpers.configrepos import config_repo_files
    from tests.helpers.fakehub import FakeHub

    work = args.workdir or Path(tempfile.mkdtemp(prefix="uiw-bench-sd15-"))
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": f"{os.cpu_count()} cpu"}
    try:
        ckpt = work / "recipes" / "sd15-full.safetensors"
        t0 = time.perf_counter()
        result["checkpoint_bytes"] = write_checkpoint(ckpt)
        result["write_checkpoint_s"] = round(time.perf_counter() - t0, 1)
        (work / "recipes" / "sd15-full.yaml").write_text("checkpoint: ./sd15-full.safetensors\nprecision: fp16\n")

        repo = FAMILIES["sd15"].config_repo.removeprefix("hf://")
        files = config_repo_files("sd15")
        configs = work / "configs"
        for rel, data in files.items():
            (configs / rel).parent.mkdir(parents=True, exist_ok=True)
            (configs / rel).write_bytes(data)
        hub = FakeHub().start()
        hub.repo(repo).push(files)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("UIW_", "HF_"))},
            "UIW_HOME": str(work / "home"),
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(work / "hf-home"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
        }
        py = sys.executable
        try:
            s, peak, out = run([py, "-m", "compiler", "recipe=sd15-full", f"recipes_dir={work / 'recipes'}"], env)
        finally:
            hub.stop()
        artifact = Path(out.strip())
        result.update(compile_s=round(s, 1), compile_peak_rss_gib=round(peak / 2**30, 2))
        result["artifact_bytes"] = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
        result["family"] = json.loads((artifact / "manifest.json").read_text())["family"]

        for name, script, arg in (
            ("artifact", LOAD_ARTIFACT, [str(artifact)]),
            ("single_file", LOAD_SINGLE_FILE, [str(ckpt), str(configs)]),
        ):
            s, peak, out = run([py, "-c", script, *arg], env)
            imports, load = (float(x) for x in out.split()[-2:])
            result[f"{name}_import_s"] = round(imports, 2)
            result[f"{name}_load_s"] = round(load, 2)
            result[f"{name}_load_peak_rss_gib"] = round(peak / 2**30, 2)
        result["single_file_over_artifact_load"] = round(result["single_file_load_s"] / result["artifact_load_s"], 2)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
