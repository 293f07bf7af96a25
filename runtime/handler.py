"""RunPod adapter only: job dict -> reply dict (or a stream of events). The logic lives in
runtime.service.

RunPod fixes per worker whether a handler streams, so there are two, chosen at start
(runtime.__main__, UIW_STREAM):
- `handler` (default): a coroutine returning the reply; per-step progress goes out through
  `runpod.serverless.progress_update` (shown by /status while the job runs). The SDK's
  progress_update posts to RunPod's job-done URL; off RunPod (the local dev server, tests) there
  is none and each call would only log an error, so progress is sent only when that URL is
  configured (RUNPOD_WEBHOOK_POST_OUTPUT), at most every UIW_PROGRESS_INTERVAL seconds.
- `stream_handler` (UIW_STREAM=1): an async generator yielding `{"status": "progress", "step",
  "steps", "elapsed_s"[, "preview"]}` per denoise step, then the normal reply as its last item.
  Such a worker answers /runsync with the list of everything it yielded (the SDK aggregates;
  `return_aggregate_stream` makes /status and /run's result carry the list too). The SDK keeps
  only the text of a streamed error, so a reply asking for `refresh_worker` also sets it in the
  start config (the SDK then stops the worker after the job).

Model work runs in a thread (asyncio.to_thread) so the SDK's event loop stays free and, with
UIW_CONCURRENCY > 1, several jobs run at once. No loop-bound state is kept: repeated
`asyncio.run(handler(job))` calls work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from runtime import bootstrap
from runtime.artifact import ArtifactError
from runtime.execute import RunContext, describe_exception
from runtime.progress import Progress
from runtime.service import get_service
from runtime.settings import SettingError, WorkerSettings, progress_interval
from runtime.threads import usable_cores

log = logging.getLogger(__name__)


def concurrency_modifier(current: int) -> int:
    """The SDK's `concurrency_modifier`: a fixed UIW_CONCURRENCY (read at start, see start_config)."""
    return _concurrency


_concurrency = 1
# The config passed to `runpod.serverless.start`, kept: the SDK reads it after every job, and a
# streaming handler can only ask for a refresh through it (see stream_handler).
_config: dict[str, Any] | None = None


def start_config(settings: WorkerSettings | None = None) -> dict[str, Any]:
    """The `runpod.serverless.start` config for the worker's settings (runtime.__main__ parses them
    at start; without them, from the environment, raising SettingError for a bad value)."""
    global _concurrency, _config
    if settings is None:
        settings = WorkerSettings.from_env(usable_cores())
    _concurrency = settings.concurrency
    config: dict[str, Any] = {
        "handler": stream_handler if settings.stream else handler,
        "concurrency_modifier": concurrency_modifier,
    }
    if settings.stream:
        config["return_aggregate_stream"] = True
    _config = config
    return config


async def _service(report: bootstrap.Report | None) -> tuple[Any, dict[str, Any] | None]:
    # A model named by the environment is being compiled (runtime.bootstrap): wait for it.
    if (failed := await asyncio.to_thread(bootstrap.wait, report, progress_interval())) is not None:
        return None, {"error": failed}
    try:
        return await asyncio.to_thread(get_service), None
    except (ArtifactError, SettingError) as e:
        return None, {"error": str(e)}
    except Exception as e:
        log.exception("loading the artifacts failed")
        return None, {"error": f"loading the artifacts failed: {type(e).__name__}: {e}", "refresh_worker": True}


def _job_id(job: dict[str, Any]) -> str | None:
    value = job.get("id")
    return value if isinstance(value, str) else None


async def _run(
    job: Any, listener: Callable[[Progress], None] | None, stream: bool, report: bootstrap.Report | None = None
) -> dict[str, Any]:
    received = time.monotonic()
    service, failed = await _service(report)
    if failed is not None:
        return failed
    if not isinstance(job, dict):
        return {"error": "job: expected a JSON object with an `input` field"}
    s3_config = job.get("s3Config")  # beside "input" in RunPod's job, as its docs define it
    context = RunContext(_job_id(job), received, listener, stream, s3_config)
    try:
        reply: dict[str, Any] = await asyncio.to_thread(service.run, job.get("input"), context)
        return reply
    except Exception as e:  # a bug of ours; the worker must still answer, and stays (no device failed)
        log.exception("request failed")
        return {"error": f"internal error: {describe_exception(e)}"}


class _Throttled:
    """progress_update at most every `interval` seconds, and always for the last step."""

    def __init__(self, job: dict[str, Any], interval: float):
        self.job, self.interval = job, interval
        self.last = float("-inf")
        self.lock = threading.Lock()

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        with self.lock:
            if progress.step < progress.steps and now - self.last < self.interval:
                return
            self.last = now
        import runpod.serverless

        runpod.serverless.progress_update(self.job, progress.event())

    def report(self, event: dict[str, Any]) -> None:  # the build's events, already spaced by bootstrap.wait
        import runpod.serverless

        runpod.serverless.progress_update(self.job, event)


def _progress_listener(job: Any) -> _Throttled | None:
    if not isinstance(job, dict) or not _job_id(job) or not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return None
    return _Throttled(job, progress_interval())  # per job; checked at start (WorkerSettings)


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    try:
        listener = _progress_listener(job)
    except SettingError as e:  # only where start_config did not run (the worker checks at start)
        return {"error": str(e)}
    return await _run(job, listener, stream=False, report=listener.report if listener is not None else None)


async def stream_handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Progress events as the denoise loop makes them, then the reply (an error reply too)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def listener(progress: Progress) -> None:  # called in the worker thread
        loop.call_soon_threadsafe(events.put_nowait, progress.event())

    def report(event: dict[str, Any]) -> None:  # the build's events (runtime.bootstrap), from its thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    task = asyncio.ensure_future(_run(job, listener, stream=True, report=report))
    try:
        while not task.done():
            get = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                yield get.result()
            else:
                get.cancel()
        # Events the thread queued before it returned are delivered before the task's result
        # (call_soon_threadsafe keeps order); any still waiting come out here, in order.
        while not events.empty():
            yield events.get_nowait()
        reply = task.result()
        if reply.get("refresh_worker") and _config is not None:
            # The SDK turns a streamed error into {"error": str} and drops refresh_worker; it
            # replaces the worker after the job when its config says so (rp_job.handle_job,
            # rp_scale.JobScaler.handle_job). Set before the reply goes out: the SDK stops
            # reading the stream at an error.
            _config["refresh_worker"] = True
        yield reply
    finally:
        if not task.done():  # the client went away: let the job finish in its thread, unobserved
            task.add_done_callback(lambda t: t.exception())
