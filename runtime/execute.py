"""A validated request on a loaded artifact -> images, with the serving concerns around the model
call: the time limit, progress, batching, the out-of-memory retry and the classification of
failures. runtime.service calls it between validation and encoding.

Failures come back as GenerationFailed with a kind (runtime.metrics.ErrorKind) and whether the
worker should be replaced (`refresh_worker`). Only a device error (CUDA, cuDNN, cuBLAS: device
state may be broken) asks for a refresh. A time limit, an out-of-memory after the low-memory
retry, non-finite latents or any other exception while running a request leave the worker
healthy: a request must never be able to stop a worker (RunPod's SDK stops the pod on
refresh_worker), and an exception that a request can trigger at will is the request's failure.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from runtime import generate as gen
from runtime.batching import Batcher
from runtime.full_mask import needs_full_mask
from runtime.loader import Loaded
from runtime.metrics import ErrorKind
from runtime.progress import Deadline, Listener, StepWatch, TimeLimitExceeded
from runtime.refiner import REFINED_TASKS, refine
from runtime.schema import GenerationRequest, RequestError, quote
from runtime.settings import ExecSettings

log = logging.getLogger(__name__)

# Serving options a request may send beside the generation fields; popped before validation
# (like `model`), so the generation schema stays the artifact's.
OPTION_FIELDS = ("timeout", "preview")


@dataclass(frozen=True)
class Options:
    timeout_s: float | None = None
    preview: bool | None = None


def pop_options(raw: Any, settings: ExecSettings) -> tuple[Options, Any]:
    """`timeout` (seconds, > 0, at most UIW_REQUEST_TIMEOUT) and `preview` (bool) out of the
    input. Raises RequestError naming the field."""
    if not isinstance(raw, dict) or not any(f in raw for f in OPTION_FIELDS):
        return Options(), raw
    rest = dict(raw)
    timeout, preview = rest.pop("timeout", None), rest.pop("preview", None)
    errors = []
    if timeout is not None:
        top = settings.request_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            errors.append(f"timeout: expected seconds greater than 0, got {quote(timeout)}")
        elif top is not None and timeout > top:
            errors.append(
                f"timeout: {quote(timeout)} s is more than this worker's limit of {top:g} s (UIW_REQUEST_TIMEOUT); "
                "send at most that, or leave it out"
            )
    if preview is not None and not isinstance(preview, bool):
        errors.append(f"preview: expected true or false, got {quote(preview)}")
    if errors:
        raise RequestError(errors)
    return Options(float(timeout) if timeout is not None else None, preview), rest


@dataclass(frozen=True)
class RunContext:
    """What the handler knows of a job beyond its input."""

    request_id: str | None = None  # the RunPod job id
    received: float | None = None  # time.monotonic() when the handler got the job
    listener: Listener | None = None  # per-step progress
    stream: bool = False  # a streaming handler: previews follow UIW_PREVIEW / the request
    s3_config: Any = None  # the job's s3Config (RunPod's per-job bucket), unchecked; runtime.outputs parses it


class GenerationFailed(Exception):
    def __init__(self, kind: ErrorKind, message: str, refresh_worker: bool):
        self.kind, self.refresh_worker = kind, refresh_worker
        super().__init__(message)

    def reply(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": str(self)}
        if self.refresh_worker:
            out["refresh_worker"] = True
        return out


@dataclass(frozen=True)
class Generated:
    images: list[Any]
    warnings: list[str]
    timings: dict[str, float]  # seconds: denoise, decode
    batch_size: int


@dataclass(frozen=True)
class _Item:
    artifact: Loaded
    pipeline: Any
    request: GenerationRequest
    watch: StepWatch | None


def _is_oom(e: BaseException) -> bool:
    import torch

    # torch.cuda.OutOfMemoryError is torch.OutOfMemoryError; the CPU allocator raises a plain
    # RuntimeError with this text.
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


def is_device_error(e: BaseException) -> bool:
    """An error of the device itself. torch raises those as RuntimeError (AcceleratorError in
    newer torch): the text is trusted only there, since other exceptions may quote a request's
    own strings (a prompt saying "CUDA error" must not stop the worker)."""
    import torch

    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(e, accelerator):
        return True
    return isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error")
    )


MAX_EXCEPTION_CHARS = 500


def describe_exception(e: BaseException) -> str:
    """`Type: message` for a reply, the message cut at MAX_EXCEPTION_CHARS (it may quote inputs)."""
    text = str(e)
    if len(text) > MAX_EXCEPTION_CHARS:
        text = text[:MAX_EXCEPTION_CHARS] + "…"
    return f"{type(e).__name__}: {text}"


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Executor:
    def __init__(self, settings: ExecSettings):
        self.settings = settings
        self.batcher: Batcher[_Item, gen.Denoised] = Batcher(settings.batch, self._denoise_batch)
        # Requests in a batchable attempt, per full batch key: one with no other of its key in
        # flight runs at once (nobody could join it), whatever else the worker is running.
        self._in_flight: dict[Hashable, int] = {}
        self._in_flight_lock = threading.Lock()

    def deadline(self, options: Options, context: RunContext) -> Deadline | None:
        start = context.received
        if options.timeout_s is not None:
            return Deadline.after(options.timeout_s, "the request's timeout", start)
        if self.settings.request_timeout_s is not None:
            return Deadline.after(self.settings.request_timeout_s, "UIW_REQUEST_TIMEOUT", start)
        return None

    def generate(
        self, artifact: Loaded, request: GenerationRequest, options: Options, context: RunContext
    ) -> Generated:
        if request.task == "controlnet":
            pipeline = artifact.controlnet_pipeline(tuple(n for n, _ in request.controlnets))
        else:
            pipeline = artifact.pipelines[request.task]
        # Settings the model ignores or changes (a FLUX.1 [dev] negative prompt) are said, not dropped silently.
        warnings = list(gen.request_warnings(pipeline, request))
        deadline = self.deadline(options, context)
        if deadline is not None and deadline.passed():
            raise GenerationFailed("timeout", str(TimeLimitExceeded(deadline.limit_s, deadline.source, 0, 0)), False)
        preview = options.preview if options.preview is not None else self.settings.preview
        watch = (
            StepWatch(context.listener, deadline, preview, (request.width, request.height))
            if context.listener is not None or deadline is not None
            else None
        )
        # A batch stops as a whole when any member's deadline passes: a request with a timeout of
        # its own (typically far shorter than the worker's) never joins one.
        # Nor a txt2img request on an inpainting model: its pipeline samples the masked image's
        # latents with the first generator of a batch only, so a batch would differ from solo calls.
        batch = options.timeout_s is None and not needs_full_mask(pipeline, request.task)
        try:
            try:
                return self._attempt(artifact, pipeline, request, watch, warnings, batch)
            except Exception as e:
                if not _is_oom(e):
                    raise
                log.warning("out of memory (%s); retrying once in low-memory mode", e)
                _free_memory()
                # Outside the attempt's Loaded.generation: it waits for the running generations.
                saved = artifact.enable_low_memory()
                warnings.append(
                    f"out of memory on the first try; retried once with {', '.join(saved) or 'memory freed'} "
                    "(this model stays in low-memory mode on this worker)"
                )
                if watch is not None:
                    watch = StepWatch(watch.listener, deadline, watch.preview, watch.size)
                return self._attempt(artifact, pipeline, request, watch, warnings, batch=False)
        except TimeLimitExceeded as e:
            raise GenerationFailed("timeout", str(e), False) from e
        except gen.NonFiniteLatents as e:
            log.warning("generation failed: %s", e)
            raise GenerationFailed("generation", f"generation failed: {e}", False) from e
        except Exception as e:
            if _is_oom(e):
                _free_memory()
                raise GenerationFailed(
                    "oom",
                    f"out of memory, also in low-memory mode ({describe_exception(e)}). hint: ask for a smaller "
                    "size or fewer images",
                    False,
                ) from e
            device = is_device_error(e)
            log.exception("generation failed (%s)", "device error" if device else "pipeline error")
            what = "the device failed" if device else "generation failed"
            raise GenerationFailed(
                "device" if device else "generation", f"{what}: {describe_exception(e)}", device
            ) from e

    @contextmanager
    def _counted(self, key: Hashable) -> Iterator[int]:
        """In flight under `key` for the block; yields how many others were."""
        with self._in_flight_lock:
            others = self._in_flight.get(key, 0)
            self._in_flight[key] = others + 1
        try:
            yield others
        finally:
            with self._in_flight_lock:
                self._in_flight[key] -= 1
                if not self._in_flight[key]:
                    del self._in_flight[key]

    def _attempt(
        self,
        artifact: Loaded,
        pipeline: Any,
        request: GenerationRequest,
        watch: StepWatch | None,
        warnings: list[str],
        batch: bool,
    ) -> Generated:
        # The whole generation inside the artifact's generation hold: shared, or alone when the
        # artifact takes turns (offload, low-memory mode), and then never batched.
        with artifact.generation() as alone:
            if artifact.refiner is not None and request.task in REFINED_TASKS:  # never batched
                t0 = time.perf_counter()
                images = refine(
                    pipeline, artifact.refiner, artifact.manifest, request, watch, artifact.loras(request.loras)
                )
                return Generated(images, warnings, {"denoise": time.perf_counter() - t0, "decode": 0.0}, 1)
            key = gen.batch_key(request) if batch and not alone and self.settings.batch.max_batch > 1 else None
            if key is None:
                return self._solo(artifact, pipeline, request, watch, warnings)
            full = (id(artifact), id(pipeline), *key)
            with self._counted(full) as others:
                if not others:  # nobody of its key in flight: nobody could join, so no window
                    return self._solo(artifact, pipeline, request, watch, warnings)
                return self._batched(full, artifact, pipeline, request, watch, warnings)

    def _solo(
        self, artifact: Loaded, pipeline: Any, request: GenerationRequest, watch: StepWatch | None, warnings: list[str]
    ) -> Generated:
        # Through runtime.generate.generate: both phases, the LoRA gate only around the denoise.
        timings: dict[str, float] = {}
        on = artifact.manifest.runtime.generator
        images = gen.generate(pipeline, request, watch, artifact.loras(request.loras), timings, on)
        return Generated(images, warnings, timings, 1)

    def _batched(
        self,
        key: Hashable,
        artifact: Loaded,
        pipeline: Any,
        request: GenerationRequest,
        watch: StepWatch | None,
        warnings: list[str],
    ) -> Generated:
        t0 = time.perf_counter()
        try:
            denoised, size = self.batcher.submit(key, _Item(artifact, pipeline, request, watch))
        except TimeLimitExceeded:
            deadline = watch.deadline if watch is not None else None
            if watch is not None and deadline is not None and (watch.interrupted or deadline.passed()):
                done, steps = watch.steps_done, watch.steps_total
                raise TimeLimitExceeded(deadline.limit_s, deadline.source, done, steps) from None
            # A batch-mate's deadline stopped the call (deadlines count from each job's arrival):
            # this request's own has not passed, so it runs again, on its own.
            log.info("a batch-mate's time limit stopped the batch; running this request again on its own")
            lost = time.perf_counter() - t0
            out = self._solo(artifact, pipeline, request, watch, warnings)
            out.timings["denoise"] += lost
            return out
        t1 = time.perf_counter()
        images = gen.decode(pipeline, denoised, request)
        return Generated(images, warnings, {"denoise": t1 - t0, "decode": time.perf_counter() - t1}, size)

    def _denoise_batch(self, items: list[_Item]) -> list[gen.Denoised]:
        first = items[0]
        return gen.denoise(
            first.pipeline,
            [i.request for i in items],
            [i.watch for i in items],
            first.artifact.loras(first.request.loras),
            first.artifact.manifest.runtime.generator,
        )
