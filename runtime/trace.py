"""One request's record: id, artifact, per-phase seconds and outcome; at the end, one structured
log line (runtime.logs renders it as JSON or text) and one entry in the worker's metrics.

Phases (seconds): queue (the job's arrival at the handler -> its work starts: thread hand-off,
batch window), load (the model loaded for it, 0 when already loaded), inputs (validation, image
fetch and decode), denoise (text encoding and the denoise loop, waiting for the LoRA gate
included), decode (VAE), encode (images -> reply values: PNG/JPEG/WebP, upload), total.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from runtime.metrics import METRICS, ErrorKind, Metrics

log = logging.getLogger("runtime.request")


@dataclass
class Trace:
    request_id: str
    received: float  # time.monotonic()
    phases: dict[str, float] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)  # artifact, task, size, ... for the log line
    kind: ErrorKind | None = None  # set where a failure is classified

    def finish(self, reply: dict[str, Any], metrics: Metrics = METRICS) -> None:
        total = time.monotonic() - self.received
        failed = "error" in reply
        outcome = f"error:{self.kind or 'invalid'}" if failed else "ok"
        phases = {**self.phases, "total": total}
        metrics.record(outcome, phases)
        now = time.time()
        line: dict[str, Any] = {
            "request_id": self.request_id,
            **self.fields,
            "outcome": outcome,
            "seconds": {k: round(v, 4) for k, v in phases.items()},
            # Wall-clock arrival and end (Unix seconds): which requests overlapped in time.
            "received_at": round(now - total, 4),
            "finished_at": round(now, 4),
        }
        if failed:
            line["error"] = str(reply["error"])[:500]
        log.log(logging.WARNING if failed else logging.INFO, "request %s", outcome, extra={"fields": line})
