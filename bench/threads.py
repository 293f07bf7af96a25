"""The worker's CPU thread choice (runtime.threads) against torch's defaults, on a busy machine:
the demo request timed in fresh processes, one per way and round, in alternating order, while
``--busy`` busy-loop processes load the cores (each ends by itself after ``--busy-seconds``, so
none outlives the bench).

    .venv/bin/python -m bench.threads [--artifact DIR] [--rounds 3] [--requests 5] [--busy N]

Ways: ``default`` (no OMP_* setting: torch's threads, OpenMP's spinning waits) and ``chosen``
(what ``python -m runtime`` does at start: runtime.threads.prefer_passive_wait before torch is
imported, then choose + apply). Each child serves one warm-up request, then times ``--requests``
requests through ``Service.run``. Without ``--artifact`` the demo recipe is compiled into a
temporary store first. Prints one JSON object per child, then a summary per way: min and median
seconds per request, and the load average (1 min) seen before each child.
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
from pathlib import Path
from typing import Any

from bench.proc import REPO, run_child

WAYS = ("default", "chosen")
REQUEST = {"prompt": "a lighthouse on a cliff at dusk", "seed": 42}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "UIW_THREADS", "UIW_CONCURRENCY")


def child(artifact: Path, way: str, requests: int) -> None:
    """One fresh process: the way's thread setup, the artifact loaded, requests timed."""
    from runtime import threads

    chosen = None
    if way == "chosen":  # the start of runtime.__main__, in its order
        threads.prefer_passive_wait()
        chosen = threads.choose(os.environ, 1, threads.usable_cores())
        threads.apply(chosen)
    import torch

    from runtime.service import Service, Settings

    service = Service(Settings(artifacts=(str(artifact),), home=artifact.parent))
    service.run(dict(REQUEST))  # first request: allocator and kernels out of the record
    seconds = []
    for _ in range(requests):
        t0 = time.perf_counter()
        reply = service.run(dict(REQUEST))
        seconds.append(round(time.perf_counter() - t0, 4))
        if "error" in reply:
            raise RuntimeError(reply["error"])
    print(
        json.dumps(
            {
                "way": way,
                "threads": torch.get_num_threads(),
                "reason": chosen.reason if chosen else "torch default",
                "wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"),
                "seconds": seconds,
            }
        )
    )


def build_demo(home: Path) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UIW_")}
    proc = subprocess.run(
        [sys.executable, "-m", "compiler", "recipe=demo"],
        cwd=REPO,
        env={**env, "UIW_HOME": str(home), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return Path(proc.stdout.strip().splitlines()[-1])


def busy(n: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    """n processes spinning on a core each until their own deadline."""
    loop = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(n)]


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for way in WAYS:
        mine = [r for r in records if r["way"] == way]
        every = [s for r in mine for s in r["seconds"]]
        out[way] = {
            "threads": sorted({r["threads"] for r in mine}),
            "min_s": min(every),
            "median_s": round(statistics.median(every), 4),
            "child_medians_s": [round(statistics.median(r["seconds"]), 4) for r in mine],
            "load_1min": [r["load_1min"] for r in mine],
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="artifact directory (default: build the demo)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5, help="timed requests per child, after one warm-up")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy-loop processes (0: none)")
    parser.add_argument(
        "--busy-seconds",
        type=float,
        default=3600,
        help="each busy loop's own deadline (a safety net: the bench stops them)",
    )
    parser.add_argument("--child", nargs=2, metavar=("ARTIFACT", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), args.child[1], args.requests)
        return

    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or build_demo(Path(tmp) / "home")
        env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
        loads = busy(args.busy, args.busy_seconds)
        records: list[dict[str, Any]] = []
        try:
            time.sleep(5)  # the load average starts to show the busy loops
            for rnd in range(args.rounds):
                order = WAYS if rnd % 2 == 0 else WAYS[::-1]
                for way in order:
                    load = round(os.getloadavg()[0], 2)
                    c = run_child(
                        ["-m", "bench.threads", "--requests", str(args.requests), "--child", str(artifact), way],
                        env,
                        timeout=900,
                    )
                    record = {**c.last_json(), "round": rnd, "load_1min": load}
                    records.append(record)
                    print(json.dumps(record), flush=True)
        finally:
            for p in loads:
                p.kill()
                p.wait()
    print(
        json.dumps(
            {"busy_processes": args.busy, "cpus": os.cpu_count(), "summary": summary(records)},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
