"""The worker's CPU threads (runtime.threads): the cores it may use from the affinity mask and the
cgroup quota, the choice's precedence, and a started worker process that logs its choice and runs
torch with it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from runtime.settings import SettingError
from runtime.threads import Cores, cgroup_quota, choose, usable_cores
from tests.conftest import LEAKY, PY, REPO
from tests.helpers.devserver import refused_start

AFFINITY = len(os.sched_getaffinity(0))


def _tree(root: Path, files: dict[str, str], proc: str) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "proc_cgroup").write_text(proc)
    return root / "proc_cgroup"


def test_cgroup_v2_quota_is_the_smallest_along_the_process_cgroup_path(tmp_path: Path):
    """cpu.max limits nest: the slice above the process's own cgroup may hold the tighter one."""
    proc = _tree(
        tmp_path,
        {
            "cg/cpu.max": "max 100000\n",
            "cg/kubepods/cpu.max": "150000 100000\n",  # 1.5 CPUs for the pod
            "cg/kubepods/worker/cpu.max": "max 100000\n",
        },
        "0::/kubepods/worker\n",
    )
    assert cgroup_quota(tmp_path / "cg", proc) == (1.5, "cgroup v2 cpu.max")
    # Rounded up (throttled together beats a core left idle), and never above the affinity mask.
    cores = usable_cores(tmp_path / "cg", proc)
    assert cores == (Cores(2, "cgroup v2 cpu.max") if AFFINITY > 2 else Cores(AFFINITY, "affinity"))


def test_cgroup_v2_in_a_container_reads_its_own_root(tmp_path: Path):
    """With a cgroup namespace the process's path is `/`: the limit sits at the mount itself."""
    proc = _tree(tmp_path, {"cg/cpu.max": "50000 100000\n"}, "0::/\n")
    assert cgroup_quota(tmp_path / "cg", proc) == (0.5, "cgroup v2 cpu.max")
    expected = Cores(1, "cgroup v2 cpu.max") if AFFINITY > 1 else Cores(1, "affinity")
    assert usable_cores(tmp_path / "cg", proc) == expected


def test_cgroup_v1_cfs_quota_and_no_limit(tmp_path: Path):
    proc = _tree(
        tmp_path,
        {"cg/cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cg/cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
        "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n",
    )
    assert cgroup_quota(tmp_path / "cg", proc) == (1.0, "cgroup v1 cpu.cfs_quota_us")
    unlimited = _tree(
        tmp_path / "u",
        {"cg/cpu/cpu.cfs_quota_us": "-1\n", "cg/cpu/cpu.cfs_period_us": "100000\n", "cg/cpu.max": "max 100000\n"},
        "1:cpu:/\n0::/\n",
    )
    assert cgroup_quota(tmp_path / "u" / "cg", unlimited) is None
    assert usable_cores(tmp_path / "u" / "cg", unlimited) == Cores(AFFINITY, "affinity")


def test_choice_precedence_and_concurrency():
    cores = Cores(8, "cgroup v2 cpu.max")
    assert choose({}, 1, cores).threads == 8
    assert choose({}, 3, cores).threads == 2  # 8 cores over 3 concurrent jobs: 2 each, not 3
    assert choose({}, 16, cores).threads == 1
    assert choose({"OMP_NUM_THREADS": "5"}, 1, cores).threads is None  # torch read it: left alone
    assert choose({"OMP_NUM_THREADS": "5", "UIW_THREADS": "3"}, 4, cores).threads == 3
    with pytest.raises(SettingError, match=r"UIW_THREADS='0'.*hint: unset it.*8 here"):
        choose({"UIW_THREADS": "0"}, 1, cores)


# The worker as `python -m runtime` starts it, up to the SDK's loop: runpod.serverless.start is
# replaced by a probe that reports torch's thread count in the start thread and in a job thread
# (jobs run in asyncio.to_thread), then exits.
PROBE = """
import asyncio, json, runpy, sys
import runpod

def start(config):
    import torch
    job = asyncio.run(asyncio.to_thread(torch.get_num_threads))
    print(json.dumps({"start": torch.get_num_threads(), "job": job}))

runpod.serverless.start = start
sys.argv = ["runtime"]
runpy.run_module("runtime", run_name="__main__", alter_sys=True)
"""


def _env(extra: dict[str, str]) -> dict[str, str]:
    """This environment less every thread setting and UIW_* (the suite's workers set OMP_NUM_THREADS)."""
    drop = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", *LEAKY}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("UIW_")}
    return {**env, "UIW_PRELOAD": "0", **extra}


def _start_log(stderr: str) -> dict[str, object]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{") and "CPU threads" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    ("settings", "expected", "why"),
    [
        ({"UIW_CONCURRENCY": "2"}, max(1, usable_cores().count // 2), "UIW_CONCURRENCY 2"),
        ({"OMP_NUM_THREADS": "1"}, 1, "OMP_NUM_THREADS=1"),
        ({"OMP_NUM_THREADS": "1", "UIW_THREADS": "3"}, 3, "UIW_THREADS=3"),
    ],
)
def test_a_started_worker_logs_its_thread_choice_and_runs_torch_with_it(
    settings: dict[str, str], expected: int, why: str
):
    proc = subprocess.run([PY, "-c", PROBE], cwd=REPO, env=_env(settings), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = _start_log(proc.stderr)
    assert line["threads"] == expected and why in str(line["message"]), line
    assert "OMP_WAIT_POLICY=PASSIVE" in str(line["message"]), line
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"start": expected, "job": expected}


@pytest.mark.parametrize("value", ["0", "many"])
def test_a_bad_uiw_threads_stops_the_worker_at_start(value: str):
    proc = refused_start(_env({"UIW_THREADS": value}), f"UIW_THREADS={value!r}")
    assert f"UIW_THREADS={value!r}" in proc.stderr and "hint:" in proc.stderr, proc.stderr[-2000:]
