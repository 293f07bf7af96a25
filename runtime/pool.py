"""Several loaded artifacts under one memory budget: least recently used evicted first.

Admission is decided before loading, from the manifest's weight files (an estimate: the loader
keeps each file's dtype, so their bytes are what the parameters take); once loaded, the artifact
is charged its measured parameter and buffer bytes instead. An artifact in use by a request
(a lease, taken with ``Pool.acquire``) is never evicted under it; requests that need room wait
for leases to end, within a bound. Concurrent requests for one unloaded artifact load it once.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runtime.artifact import ArtifactError, Manifest

log = logging.getLogger(__name__)

GPU_HEADROOM = 0.10  # of the GPU's memory, kept for activations, the VAE decode and CUDA's own
GPU_HEADROOM_MIN = 1 << 30
RAM_FRACTION = 0.6  # of the RAM available at start: the process and its activations need the rest
WAIT_S = 300.0  # how long a request waits for running requests to free room before it gives up
WEIGHT_SUFFIXES = (".safetensors",)


class PoolError(ArtifactError):
    """An artifact that cannot be served under the budget; the message has a hint."""


def default_budget() -> tuple[int, str]:
    """(bytes, how it was found): the GPU's memory less a headroom, or a share of available RAM."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        headroom = max(int(total * GPU_HEADROOM), GPU_HEADROOM_MIN)
        return total - headroom, f"CUDA total {total} B less {headroom} B headroom"
    import psutil

    available = psutil.virtual_memory().available
    return int(available * RAM_FRACTION), f"{RAM_FRACTION:.0%} of {available} B available RAM"


def estimate_bytes(manifest: Manifest) -> int:
    """The weight files' bytes (pipeline, switchable LoRAs, ControlNets): what loading will take."""
    return sum(f.size for f in manifest.files if f.path.endswith(WEIGHT_SUFFIXES))


def measured_bytes(loaded: Any) -> int:
    """Bytes of every parameter and buffer the loaded artifact holds, each storage counted once
    (the task pipelines share their modules; tied weights share storage)."""
    import torch

    modules = [m for m in loaded.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    modules += list(loaded.controlnets.values())
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            for part in _plain_tensors(t):
                storage = part.untyped_storage()
                key = (str(part.device), storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total


def _plain_tensors(t: Any) -> list[Any]:
    """A tensor, or the plain tensors inside a tensor subclass (a quantized weight: its int8/fp8
    data and scales), whose own storage cannot be read."""
    if type(t).__name__ not in ("Tensor", "Parameter") and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [p for n in names for p in _plain_tensors(getattr(t, n))]
    return [t]


@dataclass(frozen=True)
class Lease:
    loaded: Any  # runtime.loader.Loaded
    load_seconds: float | None  # set when this acquire loaded the artifact


@dataclass
class _Entry:
    loaded: Any
    footprint: int
    measured: bool
    leases: int
    last_used: float


@dataclass(frozen=True)
class Status:
    loaded: bool
    footprint: int  # measured bytes when loaded, else the estimate
    measured: bool
    load_seconds: float | None
    leases: int


class Pool:
    """Keyed by cache key: one artifact served under two names is loaded once. ``loader`` is
    runtime.loader.load unless given."""

    def __init__(self, budget: int, loader: Callable[[Path], Any] | None = None, wait_s: float = WAIT_S):
        self.budget = budget
        self.wait_s = wait_s
        if loader is None:
            from runtime.loader import load

            loader = load
        self._load: Callable[[Path], Any] = loader
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, int] = {}  # key -> estimated bytes reserved while it loads
        self._load_seconds: dict[str, float] = {}  # the last load's time, kept after eviction
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used()

    def _used(self) -> int:
        return sum(e.footprint for e in self._entries.values()) + sum(self._loading.values())

    def status(self, manifest: Manifest) -> Status:
        key = manifest.cache_key
        with self._cond:
            e = self._entries.get(key)
            if e is None:
                return Status(False, estimate_bytes(manifest), False, self._load_seconds.get(key), 0)
            return Status(True, e.footprint, e.measured, self._load_seconds.get(key), e.leases)

    @contextmanager
    def acquire(self, path: Path, manifest: Manifest) -> Iterator[Lease]:
        """The loaded artifact for the duration of the block; loads it (evicting LRU artifacts no
        request holds) when it is not loaded."""
        lease = self._take(path, manifest, evict=True)
        assert lease is not None
        try:
            yield lease
        finally:
            with self._cond:
                self._entries[manifest.cache_key].leases -= 1
                self._entries[manifest.cache_key].last_used = time.monotonic()
                self._cond.notify_all()

    def preload(self, path: Path, manifest: Manifest) -> bool:
        """Load without evicting anything: False (and a log line) when it does not fit beside
        what is loaded already."""
        lease = self._take(path, manifest, evict=False)
        if lease is None:
            return False
        with self._cond:
            self._entries[manifest.cache_key].leases -= 1
            self._cond.notify_all()
        return True

    def _take(self, path: Path, manifest: Manifest, evict: bool) -> Lease | None:
        key, need = manifest.cache_key, estimate_bytes(manifest)
        name = f"{manifest.recipe} ({manifest.cache_key[:12]})"
        if need > self.budget:
            raise PoolError(
                f"{name}: its weights take {need} B, more than the whole memory budget of {self.budget} B. "
                "hint: raise UIW_MEMORY_BUDGET, or compile the recipe at a smaller precision (precision=fp16)."
            )
        claim = self._claim(key, need, name, evict)
        if isinstance(claim, str):  # "load": room reserved for this caller
            return self._load_claimed(path, key, need, name)
        return claim

    def _claim(self, key: str, need: int, name: str, evict: bool) -> Lease | Literal["load"] | None:
        """A lease on the loaded artifact; or "load": room is reserved and the caller loads it; or
        None: it does not fit without evicting (``evict`` False). Waits (within ``wait_s``) while
        another request loads it or leased artifacts fill the budget."""
        deadline = time.monotonic() + self.wait_s
        evicted: list[_Entry] = []
        try:
            with self._cond:
                while True:
                    entry = self._entries.get(key)
                    if entry is not None:
                        entry.leases += 1
                        entry.last_used = time.monotonic()
                        return Lease(entry.loaded, None)
                    if key not in self._loading:
                        if not evict and self._used() + need > self.budget:
                            log.info(
                                "preload: %s does not fit beside what is loaded (%d B of %d B)", name, need, self.budget
                            )
                            return None
                        evicted += self._make_room(need)
                        if self._used() + need <= self.budget:
                            self._loading[key] = need
                            return "load"
                    # Another request is loading it, or leased artifacts fill the budget: wait.
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PoolError(
                            f"{name}: no room in the memory budget ({self.budget} B) within {self.wait_s:.0f} s: "
                            "the loaded artifacts are all in use. hint: raise UIW_MEMORY_BUDGET or lower the "
                            "worker's concurrency."
                        )
                    self._cond.wait(timeout=min(left, 1.0))
        finally:  # also when it gives up: what it evicted is freed either way
            _free(evicted)

    def _load_claimed(self, path: Path, key: str, need: int, name: str) -> Lease:
        """Load an artifact whose room ``_claim`` reserved, and charge its measured footprint."""
        t0 = time.perf_counter()
        try:
            loaded = self._load(path)
            footprint = measured_bytes(loaded)
        except BaseException:
            with self._cond:
                del self._loading[key]
                self._cond.notify_all()
            raise
        seconds = time.perf_counter() - t0
        with self._cond:
            del self._loading[key]
            self._entries[key] = _Entry(loaded, footprint, True, 1, time.monotonic())
            self._load_seconds[key] = seconds
            # The estimate admitted it; if the measurement is larger, make the difference good.
            over = self._make_room(0)
            self._cond.notify_all()
            used = self._used()
        _free(over)
        log.info(
            "pool: loaded %s in %.2f s, %d B (estimated %d B); %d of %d B used",
            name,
            seconds,
            footprint,
            need,
            used,
            self.budget,
        )
        return Lease(loaded, seconds)

    def _make_room(self, need: int) -> list[_Entry]:
        """Evict idle artifacts, least recently used first, until ``need`` more bytes fit (or no
        idle one is left). Called with the lock held; returns the evicted entries, freed later."""
        out: list[_Entry] = []
        idle = sorted((e.last_used, k) for k, e in self._entries.items() if e.leases == 0)
        if need and self._used() - sum(self._entries[k].footprint for _, k in idle) + need > self.budget:
            return out  # evicting every idle one would not do: evict none, wait for running requests
        for _, k in idle:
            if self._used() + need <= self.budget:
                break
            e = self._entries.pop(k)
            log.info(
                "pool: evicted %s (%s, %d B) to make room",
                e.loaded.manifest.recipe,
                e.loaded.manifest.cache_key[:12],
                e.footprint,
            )
            out.append(e)
        return out


def _free(entries: list[_Entry]) -> None:
    """Drop the pool's references and return the memory: the pipelines hold reference cycles, so
    a collection is needed before CUDA's cache can give the blocks back."""
    if not entries:
        return
    entries.clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
