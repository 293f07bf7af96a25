"""The worker's log lines: one JSON object per line (UIW_LOG_FORMAT=json, the worker's default:
what log collectors parse) or plain text for a person at a terminal (UIW_LOG_FORMAT=text).

Structured fields ride on the standard logging call's `extra={"fields": {...}}` (request id,
artifact, per-phase timings, outcome); the JSON line carries them as top-level keys, the text
line appends them as key=value.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
        return line


def configure(fmt: str, level: str = "INFO") -> None:
    """The root logger to stderr in `fmt` (replacing earlier handlers: one line per record); the
    worker passes UIW_LOG_FORMAT and UIW_LOG_LEVEL as runtime.settings parsed them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
