"""Child processes measured from outside (wall time, peak RSS by wait4) and page-cache eviction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Child:
    seconds: float  # wall time, fork to exit
    peak_rss: int  # bytes: this child's own maximum resident set (wait4's rusage)
    stdout: str
    spawned_at: float  # time.time() just before the fork: children measure their cold start from it

    def last_json(self) -> dict[str, Any]:
        """The child's result: its last stdout line, one JSON object."""
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"child printed no JSON result:\n{self.stdout[-2000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result


class ChildFailed(RuntimeError):
    pass


def run_child(args: list[str], env: dict[str, str], timeout: float = 1800) -> Child:
    """``python ARGS`` in the repo root; fails with its stderr's tail. wait4 gives this child's own
    rusage (RUSAGE_CHILDREN would be the maximum over every child so far)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        spawned = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        deadline = t0 + timeout
        while True:  # bounded: a hung child is killed at the deadline
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise ChildFailed(f"python {' '.join(args)} ran past {timeout:.0f} s. hint: raise bench timeout")
            time.sleep(0.005)
        seconds = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise ChildFailed(f"python {' '.join(args)} failed ({code}):\n{err.read()[-4000:]}")
        return Child(seconds, usage.ru_maxrss * 1024, out.read(), spawned)  # Linux: kilobytes


def evict(paths: Iterable[Path]) -> int:
    """Drop these files' pages from the page cache (posix_fadvise DONTNEED, after fsync: dirty
    pages are not dropped). Folders count with every file under them. Returns bytes evicted."""
    total = 0
    for path in paths:
        files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [Path(path)]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def resident_fraction(path: Path) -> float:
    """Share of a file's pages in the page cache (mincore via mmap is not in the stdlib; read
    /proc/self is no help): used only by tests, through ``fincore`` when present."""
    import shutil

    if shutil.which("fincore") is None:
        return float("nan")
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]) / max(1, int(out[1]))
