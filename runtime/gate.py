"""A gate for shared state that has modes: requests wanting the mode in force run together;
a request wanting another mode waits until the running ones are done, then switches it.

What it is for: switchable LoRAs live in layers every request of an artifact shares, so while
one request's set is on, a request wanting another set (or none) must not run its denoise. A
plain lock would make every request take turns; this gate lets requests with the same set (the
common case: all without LoRAs) denoise side by side, and serialises only across sets.

Fair: arrivals are served in order (tickets), so a stream of requests in the current mode cannot
starve one waiting for another mode.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager


class ModeGate:
    def __init__(self, switch: Callable[[Hashable], None]):
        self._switch = switch  # puts the shared state in a mode; called with nobody inside
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._mode: Hashable | None = None
        self._known = False  # False until a switch succeeded: the state is then as _mode says
        self._inside = 0

    @property
    def inside(self) -> int:
        return self._inside

    @contextmanager
    def hold(self, mode: Hashable) -> Iterator[None]:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket and (self._inside == 0 or (self._known and self._mode == mode))):
                    self._cond.wait()
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            try:
                if not (self._known and self._mode == mode):
                    self._known = False  # a switch that fails halfway leaves the state unknown
                    self._switch(mode)
                    self._mode, self._known = mode, True
            except BaseException:
                self._cond.notify_all()
                raise
            self._inside += 1
            self._cond.notify_all()  # the next ticket may want this mode too
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()
