"""The serving logic behind the handler: settings -> loaded artifacts; request -> reply dict.

Failures never escape as exceptions: bad input becomes {"error", "errors"} before model work;
a failure during generation becomes {"error", "refresh_worker": True} (the SDK restarts the
worker, since device state may be broken).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.artifact import ArtifactError, resolve_artifact
from runtime.encode import data_uri
from runtime.inputs import attach_images
from runtime.loader import Loaded, load
from runtime.schema import RequestError, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    artifacts: tuple[str, ...]  # directories or recipe names; the first is the default
    home: Path

    @classmethod
    def from_env(cls) -> Settings:
        entries = tuple(e.strip() for e in os.environ.get("UIW_ARTIFACTS", "").split(",") if e.strip())
        home = Path(os.environ.get("UIW_HOME", "~/.cache/uiw")).expanduser()
        return cls(artifacts=entries, home=home)


class Service:
    def __init__(self, settings: Settings):
        if not settings.artifacts:
            raise ArtifactError(
                "UIW_ARTIFACTS is empty. hint: set it to the directory `python -m compiler recipe=NAME` "
                "printed, or to the recipe name (resolved through $UIW_HOME/names/)."
            )
        self.settings = settings
        self.paths = [resolve_artifact(e, settings.home) for e in settings.artifacts]
        self.loaded: list[Loaded] = [load(p) for p in self.paths[:1]]

    @property
    def default(self) -> Loaded:
        return self.loaded[0]

    def run(self, raw_input: Any) -> dict[str, Any]:
        request_id = uuid.uuid4().hex[:12]
        artifact = self.default
        t_in = time.perf_counter()
        try:
            request, warnings = validate(raw_input, artifact.manifest)
            # Image inputs are fetched and decoded here, bounded, before any model work.
            request, image_warnings = attach_images(request, artifact.manifest.serving.limits)
        except RequestError as e:
            return {"error": "; ".join(e.errors), "errors": e.errors}
        warnings = [*warnings, *image_warnings]
        from runtime.generate import generate, request_warnings

        if request.task == "controlnet":
            pipeline = artifact.controlnet_pipeline(tuple(n for n, _ in request.controlnets))
        else:
            pipeline = artifact.pipelines[request.task]
        t0 = time.perf_counter()
        try:
            # Settings the model ignores or changes (a FLUX.1 [dev] negative prompt) are said, not dropped silently.
            warnings = [*warnings, *request_warnings(pipeline, request)]
            with artifact.loras(request.loras):
                images = generate(pipeline, request)
        except Exception as e:
            log.exception("request %s failed during generation", request_id)
            return {"error": f"generation failed: {type(e).__name__}: {e}", "refresh_worker": True}
        t1 = time.perf_counter()
        encoded = [data_uri(im) for im in images]
        log.info(
            "request %s: %s %dx%d, %d steps, %d image(s): inputs %.3f s, generate %.2f s, encode %.3f s",
            request_id,
            request.task,
            request.width,
            request.height,
            request.steps,
            len(images),
            t0 - t_in,
            t1 - t0,
            time.perf_counter() - t1,
        )
        reply: dict[str, Any] = {"images": encoded, "image_url": encoded[0], "seed": request.seed}
        if warnings:
            reply["warnings"] = warnings
        return reply


_service: Service | None = None
_lock = threading.Lock()  # a thread lock, not an asyncio one: it outlives any event loop


def get_service() -> Service:
    """The process's service, created on first use from the environment."""
    global _service
    with _lock:
        if _service is None:
            _service = Service(Settings.from_env())
        return _service
