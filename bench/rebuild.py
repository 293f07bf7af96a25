"""Incremental rebuilds on the bench stack (bench/stack.py): a single-file SD 1.5-architecture
checkpoint + 2 kohya LoRAs + 1 A1111 embedding, its config repo served by the loopback Hub.

Each compile is the CLI as a user runs it (``python -m compiler recipe=…``, a fresh process, imports
included), timed from outside:

1. cold: lock, fetch the config repo, convert the single file (stored as the converted base), fuse,
   save;
2. the unchanged recipe again (N times): a cache hit, no torch import;
3. one LoRA's scale changed: the converted base is loaded instead of converting the file again
   (the compiler logs ``converted base: hit <key>``); the blob store's files and the Hub's request
   count are compared before and after;
4. the same changed recipe in a fresh store: what that rebuild costs without the cache.

    .venv/bin/python -m bench.rebuild [--size full|tiny] [--workdir DIR] [--repeat N] [--keep]

Prints one JSON object. ``--size full`` writes ~2.1 GB of checkpoint plus LoRAs (reused from
--workdir when present) and builds fp32 artifacts of ~4.3 GB each: about 15 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HIT = re.compile(r"converted base: (hit|miss) ([0-9a-f]{64})")


@dataclass(frozen=True)
class Compile:
    seconds: float  # wall time, as the user waits for it
    cpu_seconds: float  # the child's user + system CPU time: what other load on the machine does not inflate
    artifact: str
    converted: list[tuple[str, str]]  # ("hit" | "miss", key) per conversion the build asked for
    cache_hit: bool  # the whole artifact was found: nothing built
    imported_torch: bool | None  # with --imports: whether the process imported torch


def compile_once(recipe: str, recipes: Path, env: dict[str, str], timeout: float = 1800) -> Compile:
    args = [sys.executable, "-m", "compiler", f"recipe={recipe}", f"recipes_dir={recipes}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # sums over waited children: the delta is this one
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    imported = None
    if env.get("PYTHONPROFILEIMPORTTIME"):
        names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
        imported = "torch" in names
    return Compile(
        seconds=round(seconds, 3),
        cpu_seconds=round(cpu, 3),
        artifact=proc.stdout.strip(),
        converted=[(m[0], m[1]) for m in HIT.findall(proc.stderr)],
        cache_hit=" cache hit " in proc.stderr,
        imported_torch=imported,
    )


def blobs(home: Path) -> list[str]:
    d = home / "blobs" / "sha256"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def set_first_scale(text: str, scale: float) -> str:
    """The recipe with its first LoRA's ``scale:`` replaced (the bench stack writes one per LoRA)."""
    new, n = re.subn(r"(?m)^(\s+scale:\s*)\S+$", lambda m: f"{m.group(1)}{scale}", text, count=1)
    if n != 1:
        raise SystemExit("the bench recipe names no LoRA scale. hint: bench/stack.py writes `scale:` per LoRA")
    return new


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--workdir", type=Path, default=None, help="kept between runs: the stack is written once")
    ap.add_argument("--repeat", type=int, default=5, help="unchanged recompiles timed")
    ap.add_argument("--scale", type=float, default=0.5, help="the first LoRA's new scale")
    ap.add_argument("--keep", action="store_true", help="keep the stores (artifacts of ~4.3 GB each at full size)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from bench.stack import build, config_files
    from compiler.families import FAMILIES
    from tests.helpers.fakehub import FakeHub

    work = args.workdir or Path(tempfile.mkdtemp(prefix="uiw-bench-rebuild-"))
    stack = build(work / f"stack-{args.size}", args.size)
    recipes = Path(stack.recipes_dir)
    name = f"rebuild-sd15-{args.size}"
    original = (recipes / f"{stack.recipe}.yaml").read_text()
    recipe = recipes / f"{name}.yaml"
    recipe.write_text(original)
    (recipes / f"{name}.lock.json").unlink(missing_ok=True)
    home, fresh = work / "home", work / "home-fresh"
    for d in (home, fresh):
        shutil.rmtree(d, ignore_errors=True)

    hub = FakeHub().start()
    hub.repo(FAMILIES["sd15"].config_repo.removeprefix("hf://")).push(config_files(args.size))
    base_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("UIW_", "HF_"))},
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(work / "hf-home"),
        "UIW_LOG_LEVEL": "INFO",
    }
    env = {**base_env, "UIW_HOME": str(home)}
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cpu",
        "size": args.size,
        "checkpoint_bytes": Path(stack.checkpoint).stat().st_size,
        "loras": len(stack.loras),
        "command": f".venv/bin/python -m bench.rebuild --size {args.size} --repeat {args.repeat}",
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
    }
    try:
        cold = compile_once(name, recipes, env)
        result["cold_compile_s"] = cold.seconds
        result["cold_compile_cpu_s"] = cold.cpu_seconds
        result["cold_converted"] = [c[0] for c in cold.converted]

        # Python as users run it keeps compiled bytecode (__pycache__; here under the work folder):
        # the first run writes it. PYTHONDONTWRITEBYTECODE (set in some sandboxes) recompiles every
        # project module from source on each start: measured too.
        pyc = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        pyc["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        compile_once(name, recipes, pyc)
        hits = [compile_once(name, recipes, pyc) for _ in range(args.repeat)]
        no_pyc = [compile_once(name, recipes, {**env, "PYTHONDONTWRITEBYTECODE": "1"}) for _ in range(args.repeat)]
        traced = compile_once(name, recipes, {**pyc, "PYTHONPROFILEIMPORTTIME": "1"})
        runs = [*hits, *no_pyc, traced]
        assert all(h.cache_hit and h.artifact == cold.artifact and not h.converted for h in runs)

        def spread(xs: list[float]) -> dict[str, float]:
            return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}

        result.update(
            unchanged_recompile_s=spread([h.seconds for h in hits]),
            unchanged_recompile_cpu_s=spread([h.cpu_seconds for h in hits]),
            unchanged_recompile_no_bytecode_s=spread([h.seconds for h in no_pyc]),
            unchanged_recompile_no_bytecode_cpu_s=spread([h.cpu_seconds for h in no_pyc]),
            unchanged_recompile_imports_torch=traced.imported_torch,
        )

        blobs_before, requests_before = blobs(home), len(hub.log)
        recipe.write_text(set_first_scale(original, args.scale))
        changed = compile_once(name, recipes, env)
        result.update(
            scale_change_compile_s=changed.seconds,
            scale_change_compile_cpu_s=changed.cpu_seconds,
            scale_change_converted=[c[0] for c in changed.converted],
            converted_key=changed.converted[0][1] if changed.converted else None,
            blob_files_before=len(blobs_before),
            blob_files_after=len(blobs(home)),
            blobs_unchanged=blobs(home) == blobs_before,
            hub_requests_during_scale_change=len(hub.log) - requests_before,
            new_artifact=changed.artifact != cold.artifact,
        )
        vae = "pipeline/vae/diffusion_pytorch_model.safetensors"
        entry = home / "converted" / "v1" / str(result["converted_key"])
        result["vae_hard_linked"] = (Path(changed.artifact) / vae).stat().st_ino == (entry / vae).stat().st_ino

        uncached = compile_once(name, recipes, {**base_env, "UIW_HOME": str(fresh)})
        result["scale_change_without_cache_s"] = uncached.seconds
        result["scale_change_without_cache_cpu_s"] = uncached.cpu_seconds
        result["scale_change_without_cache_converted"] = [c[0] for c in uncached.converted]
        digests = [
            json.loads((Path(a) / "manifest.json").read_text())["content_digest"]
            for a in (changed.artifact, uncached.artifact)
        ]
        result["same_artifact_either_way"] = digests[0] == digests[1]
        result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    finally:
        hub.stop()
        recipe.write_text(original)
        if not args.keep:
            for d in (home, fresh):
                shutil.rmtree(d, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
