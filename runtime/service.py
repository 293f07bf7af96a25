"""The serving logic behind the handler: settings -> loaded artifacts; request -> reply dict.

Failures never escape as exceptions: bad input becomes {"error", "errors"} before model work;
a failure during generation becomes {"error", "refresh_worker": True} (the SDK restarts the
worker, since device state may be broken).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
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
from runtime.execute import ExecSettings, Executor, GenerationFailed, Options, RunContext, pop_options
from runtime.inputs import attach_images
from runtime.loader import Loaded
from runtime.metrics import METRICS
from runtime.outputs import UploadError, deliver, destination
from runtime.pool import Pool, default_budget, parse_budget
from runtime.schema import RequestError, request_json_schema, validate
from runtime.trace import Trace
from runtime.upload import Bucket

log = logging.getLogger(__name__)


MODEL_FIELDS = ("model", "recipe")  # the request field that picks the artifact, and its alias
PRELOAD_CHOICES = "1 (the default artifact), all, 0, or a comma list of served names"


@dataclass(frozen=True)
class Settings:
    artifacts: tuple[str, ...]  # directories, recipe names or alias names; the first is the default
    home: Path
    memory_budget: int | None = None  # bytes; None: from the device (runtime.pool.default_budget)
    preload: str = "1"  # UIW_PRELOAD: see PRELOAD_CHOICES
    routing_seed: int | None = None  # UIW_ROUTING_SEED: reproducible A/B choices (tests, replays)

    @classmethod
    def from_env(cls) -> Settings:
        entries = tuple(e.strip() for e in os.environ.get("UIW_ARTIFACTS", "").split(",") if e.strip())
        home = Path(os.environ.get("UIW_HOME", "~/.cache/uiw")).expanduser()
        budget = os.environ.get("UIW_MEMORY_BUDGET", "").strip()
        seed = os.environ.get("UIW_ROUTING_SEED", "").strip()
        if seed and not seed.isdigit():
            raise ArtifactError(f"UIW_ROUTING_SEED: {seed!r} is not a whole number. hint: unset it or give e.g. 0.")
        return cls(
            artifacts=entries,
            home=home,
            memory_budget=parse_budget(budget) if budget else None,
            preload=os.environ.get("UIW_PRELOAD", "1").strip() or "1",
            routing_seed=int(seed) if seed else None,
        )


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
        self.executor = Executor(ExecSettings.from_env())  # time limit, batching, previews
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
            for r in self.served[name].routes():
                if r.weight > 0 and self.pool.preload(r.path, self.manifests.get(r.path)):
                    done.append(name)
        return done

    @property
    def default(self) -> Loaded:
        """The default model's artifact, loaded (its first route for an alias)."""
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
                        f"{given[0] if given else 'model'}: unknown model {name!r}; this worker serves: "
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
        reply = self._run(raw_input, context, trace)
        trace.finish(reply)
        return reply

    def _run(self, raw_input: Any, context: RunContext, trace: Trace) -> dict[str, Any]:
        t_in = time.perf_counter()
        try:
            selection, raw_input = self.select(raw_input)
            trace.fields.update(model=selection.served.name, artifact=selection.manifest.cache_key[:12])
            # Serving options (timeout, preview) beside the generation fields, like `model`.
            options, raw_input = pop_options(raw_input, self.executor.settings)
            # Validated against the chosen artifact's own manifest: its limits, LoRAs, tasks.
            request, warnings = validate(raw_input, selection.manifest)
            # Where the images go (a bucket or data URIs): a half-configured bucket fails here.
            bucket = destination()
            # Image inputs are fetched and decoded here, bounded, before any model work.
            request, image_warnings = attach_images(request, selection.manifest.serving.limits)
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
        try:
            with self.pool.acquire(selection.route.path, selection.manifest) as lease:
                trace.phases["load"] = lease.load_seconds or 0.0
                reply = self._generate(lease.loaded, request, warnings, options, context, trace, bucket)
        except ArtifactError as e:  # bigger than the budget, no room in time, a broken artifact
            trace.kind = "model"
            return {"error": str(e), "model": selection.reply_field()}
        except Exception as e:
            log.exception("request %s: loading %s failed", trace.request_id, selection.route.path)
            trace.kind = "model"
            return {"error": f"loading the model failed: {type(e).__name__}: {e}", "refresh_worker": True}
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
    ) -> dict[str, Any]:
        try:
            generated = self.executor.generate(artifact, request, options, context)
        except GenerationFailed as e:
            trace.kind = e.kind
            return e.reply()
        trace.phases.update(generated.timings)
        if generated.batch_size > 1:
            trace.fields["batch"] = generated.batch_size
        images, warnings = generated.images, [*warnings, *generated.warnings]
        try:  # data URIs in the request's image_format, or uploaded (URLs): runtime.outputs
            delivered = deliver(images, request, trace.request_id, bucket)
        except UploadError as e:
            trace.kind = "upload"
            return {"error": str(e)}
        trace.phases["encode"] = delivered.encode_s
        if bucket is not None:
            trace.phases["upload"] = delivered.upload_s
        reply = delivered.reply(request.seed)
        if warnings:
            reply["warnings"] = warnings
        return reply


def describe(service: Service, raw_input: dict[str, Any]) -> dict[str, Any]:
    """``{"describe": true}`` -> the served models, their artifacts (loaded or not, footprint,
    load time) and each artifact's request JSON Schema. ``model`` narrows it to one name."""
    rest = {k: v for k, v in raw_input.items() if k not in ("describe", "model")}
    if raw_input.get("describe") is not True or rest:
        return {"error": 'describe: send {"describe": true} (optionally with "model"), and nothing else'}
    names = list(service.served)
    if "model" in raw_input:
        if not isinstance(raw_input["model"], str) or raw_input["model"] not in service.served:
            return {"error": f"model: unknown model {raw_input['model']!r}; this worker serves: {', '.join(names)}"}
        names = [raw_input["model"]]
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
            if r.cache_key[:12] in artifacts:
                continue
            manifest = service.manifests.get(r.path)
            st = service.pool.status(manifest)
            artifacts[r.cache_key[:12]] = {
                "recipe": manifest.recipe,
                "family": manifest.family,
                "cache_key": manifest.cache_key,
                "dtype": manifest.runtime.dtype,
                "loaded": st.loaded,
                "load_seconds": None if st.load_seconds is None else round(st.load_seconds, 3),
                "footprint_bytes": st.footprint,
                "footprint": "measured" if st.measured else "estimated from the weight files",
                "schema": request_json_schema(manifest),  # the one validation also follows
            }
    return {
        "models": models,
        "artifacts": artifacts,
        "memory": {"budget_bytes": service.pool.budget, "used_bytes": service.pool.used},
        # Counts by outcome and latency percentiles per phase (runtime.metrics).
        "stats": METRICS.snapshot(),
    }


_service: Service | None = None
_lock = threading.Lock()  # a thread lock, not an asyncio one: it outlives any event loop


def get_service() -> Service:
    """The process's service, created on first use from the environment."""
    global _service
    with _lock:
        if _service is None:
            _service = Service(Settings.from_env())
        return _service
