"""RunPod adapter only: job dict -> reply dict. The logic lives in runtime.service.

`handler` is a coroutine so the SDK's event loop stays free while model work runs in a thread;
it keeps no loop-bound state, so repeated `asyncio.run(handler(job))` calls work.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from runtime.artifact import ArtifactError
from runtime.service import get_service

log = logging.getLogger(__name__)


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    try:
        service = await asyncio.to_thread(get_service)
    except ArtifactError as e:
        return {"error": str(e)}
    except Exception as e:
        log.exception("loading the artifacts failed")
        return {"error": f"loading the artifacts failed: {type(e).__name__}: {e}", "refresh_worker": True}
    if not isinstance(job, dict):
        return {"error": "job: expected a JSON object with an `input` field"}
    try:
        return await asyncio.to_thread(service.run, job.get("input"))
    except Exception as e:  # a bug of ours; the worker must still answer
        log.exception("request failed")
        return {"error": f"internal error: {type(e).__name__}: {e}", "refresh_worker": True}
