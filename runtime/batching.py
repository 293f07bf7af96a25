"""Compatible requests that arrive close together run as one pipeline call.

The first request of a key opens a batch and waits up to the window (UIW_BATCH_WINDOW_MS) for
others with the same key, or until the batch is full (UIW_MAX_BATCH); then it runs the batch for
all of them and each gets its own result back. With UIW_MAX_BATCH=1 nothing waits: each request
runs on its own; a request with no other of its key in flight never waits either (the caller,
runtime.execute, runs it directly). Requests run in worker threads (the handler's
asyncio.to_thread), so waiting here blocks only the request's own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from runtime.settings import BatchSettings

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Batch(Generic[T]):
    items: list[T] = field(default_factory=list)
    full: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    results: Sequence[Any] = ()
    error: BaseException | None = None


class Batcher(Generic[T, R]):
    """`submit(key, item)` -> `run([item, ...])[index]`, with items of one key batched."""

    def __init__(self, settings: BatchSettings, run: Callable[[list[T]], Sequence[R]]):
        self.settings = settings
        self._run = run
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Batch[T]] = {}

    def submit(self, key: Hashable | None, item: T) -> tuple[R, int]:
        """Returns the item's result and the size of the batch it ran in. A key of None (or
        UIW_MAX_BATCH=1) runs the item at once on its own. Whether anybody could join is the
        caller's to judge (runtime.execute counts requests in flight per key and does not submit
        a request with no other of its key in flight)."""
        if key is None or self.settings.max_batch <= 1:
            return self._run([item])[0], 1
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None
            if batch is None:
                batch = self._open[key] = _Batch()
            index = len(batch.items)
            batch.items.append(item)
            if len(batch.items) >= self.settings.max_batch:
                batch.full.set()
                del self._open[key]  # closed: the next arrival opens a new batch
        if leader:
            batch.full.wait(self.settings.window_s)
            with self._lock:
                if self._open.get(key) is batch:
                    del self._open[key]
            try:
                batch.results = self._run(list(batch.items))
            except BaseException as e:  # every member hears of it, not only the leader
                batch.error = e
            finally:
                batch.done.set()
        else:
            batch.done.wait()  # the leader sets it in a finally: never left waiting
        if batch.error is not None:
            raise batch.error
        return batch.results[index], len(batch.items)
