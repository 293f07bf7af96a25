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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--workdir", type=Path, default=None, help="kept between runs: the stack is written once")
    ap.add_argument("--repeat", type=int, default=5, help="unchanged recompiles timed")
    ap.add_argument("--scale", type=float, default=0.5, help="the first LoRA's new scale")
    ap.add_argument("--keep", action="store_true", help="keep the stores (artifacts of ~4.3 GB each at full size)")
    return ap.parse_args(argv)


@dataclass(frozen=True)
class Bench:
    """One run's inputs: the recipe under test (a copy of the stack's), its stores and environment."""

    work: Path
    recipes: Path
    name: str
    recipe: Path
    original: str  # the recipe's text before the scale change: written back at the end
    home: Path  # the store every compile but the uncached one shares
    fresh: Path  # the store of the uncached compile
    base_env: dict[str, str]  # the Hub's address, no UIW_ or HF_ settings of this process

    @property
    def env(self) -> dict[str, str]:
        return {**self.base_env, "UIW_HOME": str(self.home)}


def unchanged_recompiles(b: Bench, cold: Compile, repeat: int) -> dict[str, Any]:
    """The unchanged recipe compiled again: cache hits, with and without kept bytecode."""
    # Python as users run it keeps compiled bytecode (__pycache__; here under the work folder):
    # the first run writes it. PYTHONDONTWRITEBYTECODE (set in some sandboxes) recompiles every
    # project module from source on each start: measured too.
    pyc = {k: v for k, v in b.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    pyc["PYTHONPYCACHEPREFIX"] = str(b.work / "pycache")
    compile_once(b.name, b.recipes, pyc)
    hits = [compile_once(b.name, b.recipes, pyc) for _ in range(repeat)]
    no_pyc = [compile_once(b.name, b.recipes, {**b.env, "PYTHONDONTWRITEBYTECODE": "1"}) for _ in range(repeat)]
    traced = compile_once(b.name, b.recipes, {**pyc, "PYTHONPROFILEIMPORTTIME": "1"})
    runs = [*hits, *no_pyc, traced]
    assert all(h.cache_hit and h.artifact == cold.artifact and not h.converted for h in runs)

    def spread(xs: list[float]) -> dict[str, float]:
        return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}

    return dict(
        unchanged_recompile_s=spread([h.seconds for h in hits]),
        unchanged_recompile_cpu_s=spread([h.cpu_seconds for h in hits]),
        unchanged_recompile_no_bytecode_s=spread([h.seconds for h in no_pyc]),
        unchanged_recompile_no_bytecode_cpu_s=spread([h.cpu_seconds for h in no_pyc]),
        unchanged_recompile_imports_torch=traced.imported_torch,
    )


def scale_change(b: Bench, cold: Compile, scale: float, hub_log: list[Any]) -> tuple[Compile, dict[str, Any]]:
    """One LoRA's scale changed: the converted base reused, no blob or Hub request added."""
    blobs_before, requests_before = blobs(b.home), len(hub_log)
    b.recipe.write_text(set_first_scale(b.original, scale))
    changed = compile_once(b.name, b.recipes, b.env)
    result: dict[str, Any] = dict(
        scale_change_compile_s=changed.seconds,
        scale_change_compile_cpu_s=changed.cpu_seconds,
        scale_change_converted=[c[0] for c in changed.converted],
        converted_key=changed.converted[0][1] if changed.converted else None,
        blob_files_before=len(blobs_before),
        blob_files_after=len(blobs(b.home)),
        blobs_unchanged=blobs(b.home) == blobs_before,
        hub_requests_during_scale_change=len(hub_log) - requests_before,
        new_artifact=changed.artifact != cold.artifact,
    )
    vae = "pipeline/vae/diffusion_pytorch_model.safetensors"
    entry = b.home / "converted" / "v1" / str(result["converted_key"])
    result["vae_hard_linked"] = (Path(changed.artifact) / vae).stat().st_ino == (entry / vae).stat().st_ino
    return changed, result


def without_cache(b: Bench, changed: Compile) -> dict[str, Any]:
    """The changed recipe in a fresh store: the rebuild's cost without the converted base."""
    uncached = compile_once(b.name, b.recipes, {**b.base_env, "UIW_HOME": str(b.fresh)})
    digests = [
        json.loads((Path(a) / "manifest.json").read_text())["content_digest"]
        for a in (changed.artifact, uncached.artifact)
    ]
    return dict(
        scale_change_without_cache_s=uncached.seconds,
        scale_change_without_cache_cpu_s=uncached.cpu_seconds,
        scale_change_without_cache_converted=[c[0] for c in uncached.converted],
        same_artifact_either_way=digests[0] == digests[1],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from bench.stack import build, config_files
    from compiler.families import FAMILIES
    from tests.helpers.fakehub import FakeHub

    work = args.workdir or Path(tempfile.mkdtemp(prefix="uiw-bench-rebuild-"))
    stack = build(work / f"stack-{args.size}", args.size)
    recipes = Path(stack.recipes_dir)
    name = f"rebuild-sd15-{args.size}"
    original = (recipes / f"{stack.recipe}.yaml").read_text()
    (recipes / f"{name}.yaml").write_text(original)
    (recipes / f"{name}.lock.json").unlink(missing_ok=True)
    for d in (work / "home", work / "home-fresh"):
        shutil.rmtree(d, ignore_errors=True)

    hub = FakeHub().start()
    hub.repo(FAMILIES["sd15"].config_repo.removeprefix("hf://")).push(config_files(args.size))
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("UIW_", "HF_"))}
    base_env = {**keep, "HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf-home"), "UIW_LOG_LEVEL": "INFO"}
    b = Bench(work, recipes, name, recipes / f"{name}.yaml", original, work / "home", work / "home-fresh", base_env)
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cpu",
        "size": args.size,
        "checkpoint_bytes": Path(stack.checkpoint).stat().st_size,
        "loras": len(stack.loras),
        "command": f".venv/bin/python -m bench.rebuild --size {args.size} --repeat {args.repeat}",
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
    }
    try:
        cold = compile_once(name, recipes, b.env)
        result.update(
            cold_compile_s=cold.seconds,
            cold_compile_cpu_s=cold.cpu_seconds,
            cold_converted=[c[0] for c in cold.converted],
        )
        result.update(unchanged_recompiles(b, cold, args.repeat))
        changed, changes = scale_change(b, cold, args.scale, hub.log)
        result.update(changes)
        result.update(without_cache(b, changed))
        result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    finally:
        hub.stop()
        b.recipe.write_text(original)
        if not args.keep:
            for d in (b.home, b.fresh):
                shutil.rmtree(d, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
