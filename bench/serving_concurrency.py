"""Throughput of the worker over the SDK's local dev server: the same jobs sent one at a time,
then all at once (UIW_CONCURRENCY-style overlap), with batching off and on. Prints one JSON line
per configuration: seconds, the throughput ratio concurrent/sequential (= sequential seconds /
concurrent seconds), how many jobs ran batched, whether the images matched, and the load average
(this machine's 2 cores are shared: read the numbers with it).

    .venv/bin/python -m bench.serving_concurrency --home $UIW_HOME --artifact DIR [--jobs 6] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers.devserver import dev_server, post


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", required=True)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", default="", help="OMP_NUM_THREADS for the worker ('' = torch's default)")
    args = parser.parse_args()
    jobs = [
        {
            "prompt": f"a red fox in the snow, take {i}",
            "seed": 100 + i,
            "num_inference_steps": args.steps,
            "width": args.size,
            "height": args.size,
        }
        for i in range(args.jobs)
    ]

    def runsync(url: str, job: dict) -> dict:
        out = post(f"{url}/runsync", {"input": job}, timeout=1800)
        assert out["status"] == "COMPLETED", out
        return out["output"]

    for batch in ("1", "4"):
        env = {"UIW_HOME": args.home, "UIW_ARTIFACTS": args.artifact, "UIW_MAX_BATCH": batch}
        if args.threads:
            env["OMP_NUM_THREADS"] = args.threads
        with tempfile.TemporaryDirectory() as tmp, dev_server(env, Path(tmp)) as server:
            runsync(server.url, {**jobs[0], "seed": 1})  # warm-up
            t0 = time.perf_counter()
            seq = [runsync(server.url, j) for j in jobs]
            t_seq = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(jobs)) as pool:
                conc = list(pool.map(lambda j: runsync(server.url, j), jobs))
            t_conc = time.perf_counter() - t0
            lines = server.requests_done()[-len(jobs) :]
        print(
            json.dumps(
                {
                    "max_batch": int(batch),
                    "omp_threads": args.threads or "default",
                    "jobs": len(jobs),
                    "size": args.size,
                    "steps": args.steps,
                    "sequential_s": round(t_seq, 2),
                    "concurrent_s": round(t_conc, 2),
                    "throughput_ratio": round(t_seq / t_conc, 2),
                    "batched_jobs": sum(1 for r in lines if r.get("batch", 1) > 1),
                    "identical_images": sum(a["images"] == b["images"] for a, b in zip(seq, conc, strict=True)),
                    "load_average": round(os.getloadavg()[0], 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
