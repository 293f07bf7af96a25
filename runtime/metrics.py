"""Counts and latency percentiles of the requests this worker served: the describe reply's `stats`.

Per outcome (`ok`, or `error` by kind) a count since start; per phase (queue, load, inputs,
denoise, decode, encode, upload, total) the p50/p95/p99 of the last WINDOW requests that ran
it, so a long-lived worker reports its recent behaviour in bounded memory. Thread-safe: requests finish
in worker threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

WINDOW = 1000
PERCENTILES = (50, 95, 99)
PHASES = ("queue", "load", "inputs", "denoise", "decode", "encode", "upload", "total")

# Why a request failed, as counted and logged:
#   invalid: the request broke a rule (validation, inputs) - the client's to fix
#   model:   the model it names cannot be served (unknown alias target, over the budget, load failed)
#   timeout: it ran past its time limit (UIW_REQUEST_TIMEOUT or its own `timeout`)
#   oom:     out of memory even after the low-memory retry
#   device:  the device (CUDA) failed; the worker asks to be replaced (refresh_worker)
#   generation: anything else during generation; refresh_worker too
#   internal: a bug of ours outside generation
ErrorKind = Literal["invalid", "model", "upload", "timeout", "oom", "device", "generation", "internal"]


class Metrics:
    def __init__(self, window: int = WINDOW):
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._latency: dict[str, deque[float]] = {}
        self._window = window
        self._since = time.time()

    def record(self, outcome: str, phases: Mapping[str, float]) -> None:
        """One request done: `outcome` "ok" or "error:<kind>"; `phases` seconds per phase run."""
        with self._lock:
            self._counts[outcome] += 1
            for name, seconds in phases.items():
                self._latency.setdefault(name, deque(maxlen=self._window)).append(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            samples = {name: list(values) for name, values in self._latency.items()}
        errors = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("error:")}
        latency = {}
        for name in sorted(samples, key=lambda n: (PHASES.index(n) if n in PHASES else len(PHASES), n)):
            values = np.asarray(samples[name])
            p = np.percentile(values, PERCENTILES)
            latency[name] = {
                "count": len(values),
                **{f"p{q}_ms": round(float(v) * 1000, 2) for q, v in zip(PERCENTILES, p, strict=True)},
            }
        return {
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._since)),
            "requests": sum(counts.values()),
            "ok": counts.get("ok", 0),
            "errors": errors,
            "latency_window": self._window,
            "latency": latency,
        }


METRICS = Metrics()  # the process's: one worker, one set of stats
