"""Per-step progress of a denoise loop, through diffusers' `callback_on_step_end` (every pipeline
we serve has it): events for the client, an optional cheap preview, and the request's time limit.

One StepWatch per request. The pipeline calls `StepWatch.callback` after each step with the
pipeline object it runs on (runtime.generate's per-request shallow copy), so setting `_interrupt`
there stops only that call: the loop skips its remaining steps and returns, and generate raises
TimeLimitExceeded. A batched call has one watch per request; each watch hears the steps of the
one call (BatchWatch fans out) and previews its own image of the batch.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Linear maps from 4-channel Stable Diffusion latents to RGB: the community's well-known "latent
# preview" approximations (as in ComfyUI's latent_formats). Not a decode: a colour sketch at 1/8
# of the output size for the cost of one 4x3 matmul, which is what a progress preview needs.
SD_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))
SDXL_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_BIAS = (0.1084, -0.0175, -0.0011)
PREVIEW_QUALITY = 70


@dataclass(frozen=True)
class Progress:
    """One step done: what a client hears (runpod progress_update or a streamed event)."""

    step: int  # steps done, 1-based
    steps: int  # steps this call runs (img2img: int(steps x strength))
    elapsed: float  # seconds since the request's denoise started
    preview: str | None = None  # data:image/jpeg;base64,... when asked for

    def event(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "progress",
            "step": self.step,
            "steps": self.steps,
            "elapsed_s": round(self.elapsed, 3),
        }
        if self.preview is not None:
            out["preview"] = self.preview
        return out


Listener = Callable[[Progress], None]


class TimeLimitExceeded(Exception):
    """The denoise loop was interrupted at its request's deadline."""

    def __init__(self, limit_s: float, source: str, step: int, steps: int):
        self.limit_s, self.source, self.step, self.steps = limit_s, source, step, steps
        super().__init__(
            f"timeout: the request ran past its {limit_s:g} s limit ({source}) and was stopped after "
            f"denoising step {step} of {steps}. hint: ask for fewer steps or a smaller size, or raise "
            "the limit (the request's `timeout`, up to UIW_REQUEST_TIMEOUT)"
        )


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() value
    limit_s: float
    source: str  # which setting set it, for the error: "UIW_REQUEST_TIMEOUT" or "the request's timeout"

    @classmethod
    def after(cls, limit_s: float, source: str, start: float | None = None) -> Deadline:
        return cls((time.monotonic() if start is None else start) + limit_s, limit_s, source)

    def passed(self) -> bool:
        return time.monotonic() >= self.at


class StepWatch:
    """A request's listener, preview wish and deadline, seen from inside the denoise loop."""

    def __init__(
        self,
        listener: Listener | None = None,
        deadline: Deadline | None = None,
        preview: bool = False,
        size: tuple[int, int] = (0, 0),
    ):
        self.listener = listener
        self.deadline = deadline
        self.preview = preview and listener is not None
        self.size = size  # (width, height): FLUX's packed latents need it to unpack
        self.started = time.monotonic()
        self.steps_done = 0
        self.steps_total = 0
        self.interrupted = False

    def step(self, pipe: Any, index: int, latents: Any, image_index: int) -> bool:
        """One step done; returns True when this request wants the loop stopped."""
        self.steps_done = index + 1
        self.steps_total = int(getattr(pipe, "_num_timesteps", 0) or self.steps_done)
        if self.listener is not None:
            preview = None
            if self.preview and latents is not None:
                try:
                    preview = latent_preview(pipe, latents[image_index : image_index + 1], self.size)
                except Exception as e:  # a preview is a nicety: never the reason a request fails
                    log.warning("preview failed: %s: %s", type(e).__name__, e)
            try:
                self.listener(Progress(self.steps_done, self.steps_total, time.monotonic() - self.started, preview))
            except Exception as e:
                log.warning("progress listener failed: %s: %s", type(e).__name__, e)
        if self.deadline is not None and self.deadline.passed():
            self.interrupted = True
        return self.interrupted

    def check(self) -> None:
        """After the call: raise if the deadline cut it short."""
        if self.interrupted and self.deadline is not None:
            raise TimeLimitExceeded(self.deadline.limit_s, self.deadline.source, self.steps_done, self.steps_total)


class BatchWatch:
    """The `callback_on_step_end` of one pipeline call serving one or more requests (in order;
    each request's images are `per_request` consecutive images of the batch). The loop stops when
    any request's deadline passes: one call cannot stop for one request only. Deadlines of a
    batch can differ by much more than the batch window (each counts from its job's arrival, and
    jobs spend different times queued, loading and fetching inputs), so runtime.execute keeps
    requests with their own `timeout` out of batches and runs a member whose deadline had not
    passed again on its own; check() raises only for the watches that were interrupted."""

    def __init__(self, watches: Sequence[StepWatch | None], per_request: int = 1):
        self.watches = list(watches)
        self.per_request = per_request

    def __call__(self, pipe: Any, index: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        latents = kwargs.get("latents")
        stop = False
        for i, watch in enumerate(self.watches):
            if watch is not None:
                stop = watch.step(pipe, index, latents, i * self.per_request) or stop
        if stop:
            pipe._interrupt = True  # diffusers' loops check it before each step
        return kwargs

    def check(self) -> None:
        for watch in self.watches:
            if watch is not None:
                watch.check()


def latent_preview(pipe: Any, latents: Any, size: tuple[int, int]) -> str:
    """A latent (batch of one) -> a small JPEG data URI: the linear RGB approximation for
    4-channel SD/SDXL latents; for other latent spaces (SD3, FLUX: 16 channels) the first three
    channels, each stretched to its own range. Never runs the VAE."""
    import torch
    from PIL import Image

    x = latents.detach().float().cpu()
    if x.ndim == 3 and hasattr(pipe, "_unpack_latents"):  # FLUX packs 2x2 patches: (1, seq, 64)
        x = pipe._unpack_latents(x, size[1], size[0], pipe.vae_scale_factor)
    x = x[0]  # (C, H, W)
    if x.shape[0] == 4:
        xl = "XL" in type(pipe).__name__
        factors = torch.tensor(SDXL_RGB if xl else SD_RGB)
        rgb = torch.einsum("chw,cr->rhw", x, factors)
        if xl:
            rgb = rgb + torch.tensor(SDXL_BIAS).view(3, 1, 1)
        rgb = (rgb + 1) / 2
    else:
        rgb = x[:3]
        lo = rgb.amin(dim=(1, 2), keepdim=True)
        hi = rgb.amax(dim=(1, 2), keepdim=True)
        rgb = (rgb - lo) / (hi - lo).clamp(min=1e-6)
    pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=PREVIEW_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
