"""The bench app end to end in tiny mode: a 2-point Hydra multirun on the demo recipe writes one
record set per point (compile, artifact measured with the page cache evicted) to JSONL and CSV,
and the report callback a PNG plot and a summary; the compiled artifacts are the ones the compiler
itself gives for the same overrides. The generated SD 1.5 stack with its naive baseline and floor
runs in tiny size behind `slow` (the full size is bench/RESULTS.md's run)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from tests.conftest import PY, REPO, child_env, run_compiler


def _bench(out: Path, *args: str, timeout: float = 600) -> dict[int, list[dict]]:
    import subprocess

    env = child_env(out / "unused-home", {"UIW_BENCH_OUT": str(out / "runs")})
    proc = subprocess.run(
        [PY, "-m", "bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = (out / "runs").iterdir()
    records = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    with (sweep / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and {r["kind"] for r in rows} == {r["kind"] for r in records}
    from PIL import Image

    with Image.open(sweep / "results.png") as im:
        assert im.format == "PNG" and im.width > 400
    assert "| job |" in (sweep / "summary.md").read_text()
    by_job: dict[int, list[dict]] = {}
    for r in records:
        by_job.setdefault(r["job"], []).append(r)
    return by_job


def _check_timings(r: dict) -> None:
    assert 0 < r["ready"] <= r["first_image"] < r["cold_start"], r
    assert r["cold_start"] >= r["imports"] + r["first_image"] - 0.05, r  # fork -> PNG covers both
    assert r["peak_rss"] > 50 * 2**20 and r["bytes"] > 0, r


def test_two_point_sweep_writes_jsonl_csv_and_plot(tmp_path):
    jobs = _bench(tmp_path, "-m", "precision=fp32,fp16", "caches=[evicted]", "requests=2")
    assert sorted(jobs) == [0, 1]
    home = tmp_path / "runs"
    for job, precision in ((0, "fp32"), (1, "fp16")):
        kinds = {r["kind"]: r for r in jobs[job]}
        assert set(kinds) == {"compile", "artifact"}
        compiled, measured = kinds["compile"], kinds["artifact"]
        assert compiled["precision"] == measured["precision"] == precision and compiled["seconds"] > 0
        # The artifact measured is the one the compiler gives for these overrides (a store hit).
        store = next(home.iterdir()) / "home"
        again = run_compiler("recipe=demo", f"precision={precision}", home=store)
        assert again.returncode == 0 and again.stdout.strip() == compiled["artifact"], again.stderr[-2000:]
        assert json.loads((Path(compiled["artifact"]) / "manifest.json").read_text())["runtime"]["dtype"] == precision
        assert measured["cache"] == "evicted" and measured["dtype"] == precision and measured["requests"] == 2
        assert measured["warm_p50"] <= measured["warm_p95"]
        _check_timings(measured)
        assert measured["v_torch"] and "cpu" in measured["machine"]


def test_eviction_drops_the_page_cache(tmp_path):
    from bench.proc import evict, resident_fraction

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 * 2**20))
    path.read_bytes()
    before = resident_fraction(path)
    if before != before:  # NaN: no fincore here
        pytest.skip("needs util-linux fincore")
    assert before > 0.9
    assert evict([tmp_path]) == 8 * 2**20
    assert resident_fraction(path) < 0.1


@pytest.mark.slow
def test_tiny_stack_with_naive_baseline_and_floor(tmp_path):
    jobs = _bench(tmp_path, "recipe=stack", "stack.size=tiny", "caches=[warm]", "requests=1")
    kinds = {r["kind"]: r for r in jobs[0]}
    assert set(kinds) == {"compile", "artifact", "naive", "floor_checkpoint", "floor_artifact"}
    for kind in ("artifact", "naive"):
        _check_timings(kinds[kind])
    assert kinds["naive"]["step_from_single_file"] > 0 and kinds["naive"]["step_loras_fuse"] > 0
    # The floor reads exactly the naive worker's weight bytes: checkpoint, LoRAs, embedding.
    stack = json.loads(next((tmp_path / "runs").iterdir()).joinpath("stack-tiny", "stack.json").read_text())
    files = [stack["checkpoint"], stack["embedding"], *(lo["path"] for lo in stack["loras"])]
    from safetensors.torch import load_file

    expected = sum(t.numel() * t.element_size() for f in files for t in load_file(f).values())
    assert kinds["floor_checkpoint"]["bytes"] == expected
