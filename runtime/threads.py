"""The worker's CPU threads: torch's intra-op thread count, chosen at start from the cores this
process may use and the jobs it runs at once, unless the user chose.

Why the worker chooses: torch's default is one thread per core it can see (the affinity mask),
blind to a container's CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) and to
UIW_CONCURRENCY. A worker limited to 4 CPUs on a 64-core host then runs 32+ threads per job, and
jobs running side by side each take every core. OpenMP threads also spin while they wait for each
other, so an oversubscribed or busy machine loses the time slices to spinning: a lone 64x64 demo
request took seconds instead of a fraction of one (bench/threads.py, bench/RESULTS.md).

The rule, in order:
1. ``UIW_THREADS=N`` (1 ... runtime.settings.MAX_THREADS): N threads.
2. ``OMP_NUM_THREADS`` set: torch already read it at import; left as it is.
3. Otherwise: the whole cores this process may use (min of the affinity mask and the cgroup
   quota, rounded up) divided by UIW_CONCURRENCY, at least 1.
The same rule holds on a GPU worker: its CPU work (tokenizing, image decoding and encoding) is
small, and the quota counts there too.

Waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user set a policy: OpenMP reads it
once, when torch loads it, so runtime.__main__ calls ``prefer_passive_wait`` before importing
anything that imports torch. This module itself never imports torch at import time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime.settings import requested_threads

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 mounts the cpu controller under one of these names (often "cpu" as a link to the pair).
V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True)
class Cores:
    """Whole cores this process may use, and what limited them."""

    count: int
    source: str  # "affinity", "cgroup v2 cpu.max", "cgroup v1 cpu.cfs_quota_us", "os.cpu_count"


@dataclass(frozen=True)
class ThreadChoice:
    threads: int | None  # torch.set_num_threads(threads); None: left as torch set it (OMP_NUM_THREADS)
    reason: str  # what decided it, for the start log
    cores: Cores
    concurrency: int


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _chain(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and each of its parents up to ``base``: limits nest, the smallest one holds. A
    container whose cgroup is mounted at ``base`` itself (no cgroup namespace) still finds its own
    limit at ``base``."""
    parts = [p for p in rel.split("/") if p and p != ".."]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(root: Path, rel: str) -> float | None:
    found = []
    for d in _chain(root, rel):
        fields = (_read(d / "cpu.max") or "").split()
        if len(fields) == 2 and fields[0] != "max":  # "max 100000": no limit at this level
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                continue
            if quota > 0 and period > 0:
                found.append(quota / period)
    return min(found) if found else None


def _v1_quota(root: Path, rel: str) -> float | None:
    found = []
    for name in V1_CPU_DIRS:
        for d in _chain(root / name, rel):
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota is None or period is None:
                continue
            try:
                q, p = int(quota), int(period)
            except ValueError:
                continue
            if q > 0 and p > 0:  # -1: no limit at this level
                found.append(q / p)
    return min(found) if found else None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[float, str] | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when there is none."""
    limits: list[tuple[float, str]] = []
    for line in (_read(proc_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # the v2 (unified) hierarchy
            q = _v2_quota(root, rel)
            if q is not None:
                limits.append((q, "cgroup v2 cpu.max"))
        elif "cpu" in controllers.split(","):
            q = _v1_quota(root, rel)
            if q is not None:
                limits.append((q, "cgroup v1 cpu.cfs_quota_us"))
    return min(limits) if limits else None


def usable_cores(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Cores:
    """Whole cores this process may use: its affinity mask, lowered by a cgroup CPU quota (rounded
    up: a 1.5-CPU quota gets 2 threads, throttled together rather than one core left idle)."""
    if hasattr(os, "sched_getaffinity"):
        cores = Cores(len(os.sched_getaffinity(0)), "affinity")
    else:
        cores = Cores(os.cpu_count() or 1, "os.cpu_count")
    quota = cgroup_quota(root, proc_cgroup)
    if quota is not None and math.ceil(quota[0]) < cores.count:
        cores = Cores(max(1, math.ceil(quota[0])), quota[1])
    return cores


def choose(env: Mapping[str, str], concurrency: int, cores: Cores) -> ThreadChoice:
    """The rule of this module's docstring for an environment; raises SettingError for a bad
    UIW_THREADS (parsed by runtime.settings)."""
    return decide(requested_threads(env, cores), env.get("OMP_NUM_THREADS", "").strip(), concurrency, cores)


def decide(requested: int | None, omp_num_threads: str, concurrency: int, cores: Cores) -> ThreadChoice:
    """The rule of this module's docstring: ``requested`` is UIW_THREADS parsed (None: unset),
    ``omp_num_threads`` the OMP_NUM_THREADS value ("" when unset)."""
    if requested is not None:
        return ThreadChoice(requested, f"UIW_THREADS={requested}", cores, concurrency)
    if omp_num_threads:
        return ThreadChoice(None, f"OMP_NUM_THREADS={omp_num_threads}, read by torch", cores, concurrency)
    threads = max(1, cores.count // concurrency)
    reason = f"{cores.count} usable cores ({cores.source}) / UIW_CONCURRENCY {concurrency}"
    return ThreadChoice(threads, reason, cores, concurrency)


def prefer_passive_wait(env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user set one; returns the policy in force. Only
    effective before torch (its OpenMP runtime) is first imported."""
    return env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def apply(choice: ThreadChoice) -> int:
    """Set torch's intra-op threads as chosen; returns the count torch now uses. The setting is
    process-wide: the request threads (asyncio.to_thread) use it too."""
    import torch

    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    return int(torch.get_num_threads())
