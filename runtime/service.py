"""The serving logic behind the handler: settings -> loaded artifacts; request -> reply dict.

Failures never escape as exceptions, and each is classified (runtime.metrics.ErrorKind): bad
input becomes {"error", "errors"} before model work; a model that cannot be loaded, {"error"}
(with "refresh_worker": True when the load itself failed); a failure during generation,
{"error"}, with "refresh_worker": True only for a device error (runtime.execute: no request can
make the worker ask to be replaced); a failure after it (encoding the images) or any other bug
of ours, {"error": "internal error: ..."} without a refresh (the device is fine).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime.aliases import AliasWatch, Route, choose
from runtime.artifact import (
    ArtifactError,
    Manifest,
    alias_path,
    names_path,
    read_alias,
    read_manifest,
    resolve_artifact,
)
from runtime.execute import (
    OPTION_FIELDS,
    Executor,
    GenerationFailed,
    Options,
    RunContext,
    describe_exception,
    is_device_error,
    pop_options,
)
from runtime.inputs import attach_images
from runtime.loader import Loaded
from runtime.metrics import METRICS
from runtime.outputs import Delivered, UploadError, deliver, destination
from runtime.pool import Pool, default_budget
from runtime.request_schema import request_json_schema
from runtime.schema import RequestError, quote, validate
from runtime.settings import Bucket, ExecSettings, Settings
from runtime.trace import Trace
from runtime.video_reply import DeliveredVideo, VideoOptions, deliver_video, describe_video_options, video_request

log = logging.getLogger(__name__)


MODEL_FIELDS = ("model", "recipe")  # the request field that picks the artifact, and its alias
PRELOAD_CHOICES = "1 (the default artifact), all, 0, or a comma list of served names"


@dataclass(frozen=True)
class Served:
    """One public name of this worker: a fixed artifact (a directory or a recipe name, resolved
    at start) or an alias (its routes re-read when its file changes)."""

    name: str
    kind: Literal["artifact", "recipe", "alias"]
    path: Path | None = None
    alias: AliasWatch | None = None

    def routes(self) -> tuple[Route, ...]:
        if self.alias is not None:
            return self.alias.routes()
        assert self.path is not None
        return (Route(self.name, self.path.name, 1.0, self.path),)


@dataclass(frozen=True)
class Selection:
    served: Served
    route: Route
    manifest: Manifest

    def reply_field(self) -> dict[str, str]:
        return {"name": self.served.name, "recipe": self.manifest.recipe, "artifact": self.manifest.cache_key[:12]}


def resolve_served(entry: str, home: Path) -> Served:
    """An entry of UIW_ARTIFACTS -> its public name and what it serves."""
    p = Path(entry).expanduser()
    if p.is_dir() or os.sep in entry or entry.startswith("."):
        path = resolve_artifact(entry, home)
        return Served(read_manifest(path).recipe, "artifact", path=path)
    is_alias = alias_path(home, entry).is_file()
    if is_alias and names_path(home, entry).is_file():
        raise ArtifactError(
            f"UIW_ARTIFACTS: {entry!r} is both an alias ({alias_path(home, entry)}) and a recipe name "
            f"({names_path(home, entry)}). hint: rename the alias (`python -m compiler.store alias set OTHER ...`) "
            "so that one name means one thing."
        )
    if is_alias:
        read_alias(home, entry)  # a broken file fails here, at start
        return Served(entry, "alias", alias=AliasWatch(home, entry))
    return Served(entry, "recipe", path=resolve_artifact(entry, home))


@dataclass
class _Manifests:
    """Manifests by artifact directory, read once (an artifact never changes once READY)."""

    cache: dict[Path, Manifest] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, path: Path) -> Manifest:
        with self.lock:
            if path not in self.cache:
                self.cache[path] = read_manifest(path)
            return self.cache[path]


class Service:
    def __init__(self, settings: Settings):
        if not settings.artifacts:
            raise ArtifactError(
                "UIW_ARTIFACTS is empty. hint: set it to the directory `python -m compiler recipe=NAME` "
                "printed, to the recipe name (resolved through $UIW_HOME/names/), or to an alias name; "
                "several, comma-separated, serve several models (the first is the default)."
            )
        self.settings = settings
        self.served: dict[str, Served] = {}
        for entry in settings.artifacts:
            s = resolve_served(entry, settings.home)
            if s.name in self.served:
                raise ArtifactError(
                    f"UIW_ARTIFACTS: two entries are served as {s.name!r} ({entry!r} and an earlier one). "
                    "hint: list each model once; to serve two builds of one recipe, give them aliases "
                    "(`python -m compiler.store alias set NAME CACHE_KEY`) and list the aliases."
                )
            self.served[s.name] = s
        self.default_name = next(iter(self.served))
        self.manifests = _Manifests()
        for s in self.served.values():  # every fixed artifact is checked (READY, manifest) at start
            for r in s.routes():
                self.manifests.get(r.path)
        if settings.memory_budget is not None:
            budget, source = settings.memory_budget, "UIW_MEMORY_BUDGET"
        else:
            budget, source = default_budget()
        log.info("memory budget %d B (%s); serving %s", budget, source, ", ".join(self.served))
        self.pool = Pool(budget)
        self.executor = Executor(settings.execution)  # time limit, batching, previews
        self._rng = random.Random(settings.routing_seed)
        self._rng_lock = threading.Lock()
        self.preload(settings.preload)

    def preload(self, spec: str) -> list[str]:
        """Load what UIW_PRELOAD names, in order, as far as the budget allows without evicting;
        returns the names loaded."""
        spec = spec.strip()
        if spec == "0":
            return []
        if spec == "1":
            names = [self.default_name]
        elif spec == "all":
            names = list(self.served)
        else:
            names = [n.strip() for n in spec.split(",") if n.strip()]
            unknown = [n for n in names if n not in self.served]
            if unknown:
                raise ArtifactError(
                    f"UIW_PRELOAD: {', '.join(map(repr, unknown))} not served by this worker. hint: use "
                    f"{PRELOAD_CHOICES}; served: {', '.join(self.served)}."
                )
        done = []
        for name in names:
            # One model that cannot be loaded (over the budget, a broken artifact) is logged and
            # skipped: the others still load and serve; a request for it gets its error then.
            try:
                for r in self.served[name].routes():
                    if r.weight > 0 and self.pool.preload(r.path, self.manifests.get(r.path)):
                        done.append(name)
            except Exception as e:
                log.error(
                    "preload: %s not loaded: %s: %s",
                    name,
                    type(e).__name__,
                    e,
                    exc_info=not isinstance(e, ArtifactError),
                )
        return done

    @property
    def default(self) -> Loaded:
        """The default model's artifact, loaded (its first route for an alias). A test and bench
        convenience only: the lease ends before this returns, so the pool may evict the artifact
        while the caller still holds it (requests go through ``run``, which holds a lease)."""
        route = self.served[self.default_name].routes()[0]
        with self.pool.acquire(route.path, self.manifests.get(route.path)) as lease:
            loaded: Loaded = lease.loaded
        return loaded

    def select(self, raw_input: Any) -> tuple[Selection, Any]:
        """Pop ``model`` (or ``recipe``) from the input and pick the artifact that serves it (for an
        alias: one route at random by weight). Returns the selection and the rest of the input."""
        if not isinstance(raw_input, dict):
            served = self.served[self.default_name]
            rest: Any = raw_input
        else:
            rest = dict(raw_input)
            given = [f for f in MODEL_FIELDS if f in rest]
            if len(given) == 2:
                raise RequestError(["recipe: both 'model' and its alias 'recipe' given; send only 'model'"])
            name = rest.pop(given[0]) if given else self.default_name
            if not isinstance(name, str) or name not in self.served:
                raise RequestError(
                    [
                        f"{given[0] if given else 'model'}: unknown model {quote(name)}; this worker serves: "
                        f"{', '.join(map(repr, self.served))}. hint: send one of these names, or leave the "
                        f"field out for the default ({self.default_name!r})"
                    ]
                )
            served = self.served[name]
        routes = served.routes()
        with self._rng_lock:
            route = choose(routes, self._rng)
        return Selection(served, route, self.manifests.get(route.path)), rest

    def describe(self, raw_input: dict[str, Any]) -> dict[str, Any]:
        return describe(self, raw_input)

    def run(self, raw_input: Any, context: RunContext | None = None) -> dict[str, Any]:
        """job["input"] -> reply. `context`: what the handler knows of the job (its id, arrival
        time, a progress listener). Every request ends with one log line and one metrics entry."""
        if isinstance(raw_input, dict) and "describe" in raw_input:
            return self.describe(raw_input)
        context = context or RunContext()
        trace = Trace(context.request_id or uuid.uuid4().hex[:12], context.received or time.monotonic())
        trace.phases["queue"] = time.monotonic() - trace.received
        try:
            reply = self._run(raw_input, context, trace)
        except Exception as e:  # a bug of ours outside loading and generation (those are classified)
            log.exception("request %s failed", trace.request_id)
            trace.kind = "internal"
            reply = {"error": f"internal error: {describe_exception(e)}"}
        trace.finish(reply)
        return reply

    def _run(self, raw_input: Any, context: RunContext, trace: Trace) -> dict[str, Any]:
        t_in = time.perf_counter()
        try:
            selection, raw_input = self.select(raw_input)
            trace.fields.update(model=selection.served.name, artifact=selection.manifest.cache_key[:12])
            # Serving options (timeout, preview) beside the generation fields, like `model`.
            options, raw_input = pop_options(raw_input, self.executor.settings)
            # A video pipeline's output fields (video_format, fps, quality) shape the reply, not the call.
            video, raw_input, video_warnings = video_request(raw_input, selection.manifest)
            # Validated against the chosen artifact's own manifest: its limits, LoRAs, tasks.
            request, warnings = validate(raw_input, selection.manifest)
            warnings = [*video_warnings, *warnings]
            # Where the images go (a bucket or data URIs): a half-configured bucket fails here.
            bucket = destination(context.s3_config)
            # Image inputs are fetched and decoded here, bounded, before any model work.
            # ... within the request's deadline (its `timeout` or UIW_REQUEST_TIMEOUT) too.
            deadline = self.executor.deadline(options, context)
            request, image_warnings = attach_images(request, selection.manifest.serving.limits, deadline)
        except RequestError as e:
            trace.kind = "invalid"
            return {"error": "; ".join(e.errors), "errors": e.errors}
        except ArtifactError as e:  # an alias file gone or broken since start
            trace.kind = "model"
            return {"error": str(e)}
        except UploadError as e:
            trace.kind = "upload"
            return {"error": str(e)}
        trace.phases["inputs"] = time.perf_counter() - t_in
        trace.fields.update(
            task=request.task,
            width=request.width,
            height=request.height,
            steps=request.steps,
            images=request.num_images,
        )
        warnings = [*warnings, *image_warnings]
        with ExitStack() as stack:
            # Only taking the lease (loading, evicting) is "the model failed"; what runs under the
            # lease classifies its own failures (runtime.execute, _generate; a bug: run).
            try:
                lease = stack.enter_context(self.pool.acquire(selection.route.path, selection.manifest))
            except ArtifactError as e:  # bigger than the budget, no room in time, a broken artifact
                trace.kind = "model"
                return {"error": str(e), "model": selection.reply_field()}
            except Exception as e:  # a half-done load may leave device memory in a bad state
                log.exception("request %s: loading %s failed", trace.request_id, selection.route.path)
                trace.kind = "model"
                return {
                    "error": f"loading the model failed: {describe_exception(e)}",
                    "model": selection.reply_field(),
                    "refresh_worker": True,
                }
            trace.phases["load"] = lease.load_seconds or 0.0
            reply = self._generate(lease.loaded, request, warnings, options, context, trace, bucket, video)
        reply["model"] = selection.reply_field()
        if lease.load_seconds is not None:
            reply["load_seconds"] = round(lease.load_seconds, 3)
        return reply

    def _generate(
        self,
        artifact: Loaded,
        request: Any,
        warnings: list[str],
        options: Options,
        context: RunContext,
        trace: Trace,
        bucket: Bucket | None = None,
        video: VideoOptions | None = None,
    ) -> dict[str, Any]:
        try:
            generated = self.executor.generate(artifact, request, options, context)
        except GenerationFailed as e:
            trace.kind = e.kind
            return e.reply()
        except Exception as e:  # not classified by the executor: only a device error replaces the worker
            log.exception("request %s: generation failed", trace.request_id)
            device = is_device_error(e)
            trace.kind = "device" if device else "generation"
            failed: dict[str, Any] = {
                "error": f"{'the device failed' if device else 'generation failed'}: {describe_exception(e)}"
            }
            if device:
                failed["refresh_worker"] = True
            return failed
        trace.phases.update(generated.timings)
        if generated.batch_size > 1:
            trace.fields["batch"] = generated.batch_size
        images, warnings = generated.images, [*warnings, *generated.warnings]
        try:  # data URIs in the request's image_format, or uploaded (URLs): runtime.outputs, runtime.video_reply
            delivered: Delivered | DeliveredVideo = (
                deliver(images, request, trace.request_id, bucket)
                if video is None
                else deliver_video(images, video, trace.request_id, bucket)
            )
        except UploadError as e:
            trace.kind = "upload"
            return {"error": str(e)}
        except Exception as e:  # encoding the images (CPU work): the device is fine, no refresh
            log.exception("request %s: encoding the images failed", trace.request_id)
            trace.kind = "internal"
            return {"error": f"internal error: encoding the images failed: {describe_exception(e)}"}
        trace.phases["encode"] = delivered.encode_s
        if bucket is not None:
            trace.phases["upload"] = delivered.upload_s
        reply = delivered.reply(request.seed)
        if warnings:
            reply["warnings"] = warnings
        return reply


def worker_input_schema(
    manifest: Manifest, names: list[str], default_routes_here: bool, settings: ExecSettings
) -> dict[str, Any]:
    """The JSON Schema of a whole job input served by this artifact: its request schema
    (runtime.request_schema.request_json_schema, what ``validate`` follows) plus the fields the worker
    takes out before validating: ``model`` or its alias ``recipe`` (MODEL_FIELDS; the served
    names that route here; required unless the default model routes here, never both) and the
    serving options (runtime.execute.OPTION_FIELDS: ``timeout``, ``preview``)."""
    schema = request_json_schema(manifest)
    props = schema["properties"]
    describe_video_options(manifest, props)
    for f in MODEL_FIELDS:
        props[f] = {
            "type": "string",
            "enum": list(names),
            "title": f,
            "description": "the served model to use" if f == "model" else "alias of model",
        }
    schema["dependentSchemas"][MODEL_FIELDS[1]] = {"not": {"required": [MODEL_FIELDS[0]]}}
    if not default_routes_here:
        schema["allOf"].append({"anyOf": [{"required": [f]} for f in MODEL_FIELDS]})
    top = settings.request_timeout_s
    options: dict[str, dict[str, Any]] = {
        "timeout": {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, **({} if top is None else {"maximum": top})},
                {"type": "null"},
            ],
            "title": "timeout",
            "description": "seconds this request may take, at most the worker's UIW_REQUEST_TIMEOUT",
        },
        "preview": {
            "anyOf": [{"type": "boolean"}, {"type": "null"}],
            "title": "preview",
            "description": "progress events carry a latent preview (default: UIW_PREVIEW)",
        },
    }
    assert set(options) == set(OPTION_FIELDS), "every serving option runtime.execute pops has a schema"
    props.update(options)
    return schema


def describe(service: Service, raw_input: dict[str, Any]) -> dict[str, Any]:
    """``{"describe": true}`` -> the served models, their artifacts (loaded or not, footprint,
    load time) and each artifact's JSON Schema of the whole job input (worker_input_schema).
    ``model`` (or its alias ``recipe``) narrows it to one name."""
    rest = {k: v for k, v in raw_input.items() if k != "describe" and k not in MODEL_FIELDS}
    given = [f for f in MODEL_FIELDS if f in raw_input]
    if raw_input.get("describe") is not True or rest or len(given) > 1:
        return {"error": 'describe: send {"describe": true} (optionally with "model" or "recipe"), and nothing else'}
    names = list(service.served)
    if given:
        field, name = given[0], raw_input[given[0]]
        if not isinstance(name, str) or name not in service.served:
            return {"error": f"{field}: unknown model {quote(name)}; this worker serves: {', '.join(names)}"}
        names = [name]
    routing, default_keys = _routing(service)
    models: list[dict[str, Any]] = []
    artifacts: dict[str, dict[str, Any]] = {}
    for name in names:
        served = service.served[name]
        try:
            routes = served.routes()
        except ArtifactError as e:
            models.append({"name": name, "kind": served.kind, "error": str(e)})
            continue
        models.append(
            {
                "name": name,
                "kind": served.kind,
                "default": name == service.default_name,
                "routes": [{"target": r.target, "weight": r.weight, "artifact": r.cache_key[:12]} for r in routes],
            }
        )
        for r in routes:
            if r.cache_key[:12] not in artifacts:
                manifest = service.manifests.get(r.path)
                names_here, default_here = routing.get(r.cache_key, []), r.cache_key in default_keys
                artifacts[r.cache_key[:12]] = _describe_artifact(service, manifest, names_here, default_here)
    return {
        "models": models,
        "artifacts": artifacts,
        "memory": {"budget_bytes": service.pool.budget, "used_bytes": service.pool.used},
        # Counts by outcome and latency percentiles per phase (runtime.metrics).
        "stats": METRICS.snapshot(),
    }


def _routing(service: Service) -> tuple[dict[str, list[str]], set[str]]:
    """Which served names can send a request to each artifact (live routes, by cache key), and
    the artifacts the default model routes to: what each artifact's schema says of ``model``."""
    routing: dict[str, list[str]] = {}
    default_keys: set[str] = set()
    for n, s in service.served.items():
        try:
            live = [r.cache_key for r in s.routes() if r.weight > 0]
        except ArtifactError:
            continue
        for key in live:
            routing.setdefault(key, []).append(n)
        if n == service.default_name:
            default_keys.update(live)
    return routing, default_keys


def _describe_artifact(service: Service, manifest: Manifest, names: list[str], default_here: bool) -> dict[str, Any]:
    st = service.pool.status(manifest)
    return {
        "recipe": manifest.recipe,
        "family": manifest.family,
        "tasks": list(manifest.capabilities.tasks),  # what its requests may ask (image/mask pick the task)
        "cache_key": manifest.cache_key,
        "dtype": manifest.runtime.dtype,
        "loaded": st.loaded,
        "load_seconds": None if st.load_seconds is None else round(st.load_seconds, 3),
        "footprint_bytes": st.footprint,
        "footprint": "measured" if st.measured else "estimated from the weight files",
        # The whole job input: validation's own schema plus model/recipe, timeout, preview.
        "schema": worker_input_schema(manifest, names, default_here, service.executor.settings),
    }


_service: Service | None = None
_lock = threading.Lock()  # a thread lock, not an asyncio one: it outlives any event loop


def get_service(settings: Settings | None = None) -> Service:
    """The process's service, created on first use: from ``settings`` (the worker's, parsed at
    start), else from the environment (an in-process handler: tests, the bench)."""
    global _service
    with _lock:
        if _service is None:
            _service = Service(settings if settings is not None else Settings.from_env())
        return _service
