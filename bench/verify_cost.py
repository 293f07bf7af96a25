"""What verifying an artifact's files costs a load (runtime.fastload.Verifier: sha256 in a thread
beside the load, of the files the verification memo does not vouch for).

    .venv/bin/python -m bench.verify_cost [--reps 7] [--mib 1024] [--artifact DIR] [--workdir DIR]

Part 1, the tiny demo artifact (compiled into a scratch store unless --artifact is given):
``runtime.loader.load`` on the CPU with ``verify="off"`` (stat only) and ``verify="full"`` (every
file hashed), alternating which goes first in each repetition.

Part 2, one large random-weight safetensors file (--mib, fp16): a load that reads every byte
(``safetensors.torch.load_file``, every page touched), alone and with the Verifier hashing the same file meanwhile,
alternating; and the hash alone, for the throughput. Page cache warm (each file read once before
timing): the cold case adds the disk's read time to both sides alike.

Wall seconds (perf_counter) and process CPU seconds (every thread), min and median per case, the
load average before and after. Prints one JSON object. The memo makes a load of unchanged files
hash nothing: those loads cost what ``off`` costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    wall, cpu = [s[0] for s in samples], [s[1] for s in samples]
    return {
        "wall_min_s": round(min(wall), 4),
        "wall_median_s": round(statistics.median(wall), 4),
        "cpu_min_s": round(min(cpu), 4),
        "cpu_median_s": round(statistics.median(cpu), 4),
    }


def _alternate(cases: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, float]]:
    """Each repetition runs every case once, the order rotated each time (a neighbour's burst
    then hits each case alike)."""
    names = list(cases)
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            samples[n].append(_timed(cases[n]))
    return {n: _summary(s) for n, s in samples.items()}


def demo_artifact(workdir: Path) -> Path:
    home = workdir / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "compiler", "recipe=demo", f"home={home}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return Path(proc.stdout.strip())


def tiny(artifact: Path, reps: int) -> dict[str, Any]:
    from runtime.artifact import read_manifest
    from runtime.loader import load

    load(artifact, "cpu", verify="full")  # imports, page cache
    out = _alternate(
        {"off": lambda: load(artifact, "cpu", verify="off"), "full": lambda: load(artifact, "cpu", verify="full")},
        reps,
    )
    files = [artifact / f.path for f in read_manifest(artifact).files]
    return {"bytes": sum(p.stat().st_size for p in files), "files": len(files), **out}


def large(workdir: Path, mib: int, reps: int, manifest_of: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from runtime.artifact import FileEntry, read_manifest, sha256_file
    from runtime.fastload import PAGE, Verifier

    folder = workdir / "large"
    (folder / "pipeline").mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline" / "weights.safetensors"
    rng = np.random.default_rng(0)
    per = 64 << 20  # 64 MiB tensors, like a UNet's larger blocks
    tensors = {
        f"t{i}": torch.from_numpy(rng.standard_normal(per // 2, dtype=np.float32).astype(np.float16))
        for i in range(max(1, mib // 64))
    }
    save_file(tensors, str(path))
    del tensors
    entry = FileEntry(path="pipeline/weights.safetensors", sha256=sha256_file(path), size=path.stat().st_size)
    # The demo manifest stands in for the rest (the Verifier names the artifact only in its errors).
    manifest = read_manifest(manifest_of).model_copy(update={"files": (entry,)})

    def read_all() -> None:
        # load_file maps the file: the bytes are read when a tensor is touched (one element per
        # page, as runtime.fastload.fault_in does)
        for t in load_file(str(path)).values():
            t.reshape(-1)[:: PAGE // t.element_size()].sum()

    def plain() -> None:
        read_all()

    def verified() -> None:
        with Verifier(folder, manifest, [entry]):
            read_all()

    plain()  # page cache warm for every case
    out: dict[str, Any] = _alternate(
        {"load": plain, "load+verify": verified, "hash_alone": lambda: sha256_file(path)}, reps
    )
    size = entry.size
    out["hash_alone"]["gb_per_s"] = round(size / out["hash_alone"]["wall_median_s"] / 1e9, 2)
    out["overhead_median_s"] = round(out["load+verify"]["wall_median_s"] - out["load"]["wall_median_s"], 4)
    out["overhead_min_s"] = round(out["load+verify"]["wall_min_s"] - out["load"]["wall_min_s"], 4)
    return {"bytes": size, **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verify_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--mib", type=int, default=1024, help="size of the large random-weight file")
    ap.add_argument("--artifact", type=Path, default=None, help="a compiled artifact (default: demo, compiled)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory(prefix="uiw-verify-cost-") as tmp:
        workdir = args.workdir or Path(tmp)
        artifact = args.artifact or demo_artifact(workdir)
        before = os.getloadavg()
        report = {
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "tiny": tiny(artifact, args.reps),
            "large": large(workdir, args.mib, args.reps, artifact),
            "loadavg_before": before,
            "loadavg_after": os.getloadavg(),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
