"""Every setting the worker reads from its environment (``UIW_*``, ``BUCKET_*``), parsed here and
nowhere else.

At start runtime.__main__ parses them into one frozen ``WorkerSettings``: a bad value stops the
worker (exit code 2) with the variable, what it expects and a hint, before any model is loaded. The
rest of the runtime receives that value or its parts (``Settings`` for the service, ``ExecSettings``
for the executor, ``BatchSettings`` for the batcher).

Five readers are called per use instead, on purpose, each parsing here: ``bucket`` (per request,
runtime.outputs: a changed bucket needs no restart, and a half-configured one is that request's
error reply, as before; a job's ``s3Config`` is parsed by ``job_bucket``), ``url_expires`` (per
upload), ``allow_private_urls`` (per image fetch, a flag that cannot be wrong),
``verify_mode`` (per artifact load, runtime.loader) and ``progress_interval`` (per job,
runtime.handler). The last two are in ``WorkerSettings`` too, so that a bad value still stops the
worker at start; reading them per use keeps an in-process service (tests, bench scripts)
following its environment.

A ``Settings`` built in code (``Settings(artifacts=..., home=...)`` in tests and bench scripts)
takes its execution settings (time limit, previews, batching) from the environment when not
given, through the same parsers, as the service did before it received them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import ByteSize, TypeAdapter, ValidationError

from runtime.artifact import DEFAULT_HOME
from runtime.integrity import VERIFY_MODES, VerifyMode

if TYPE_CHECKING:
    from runtime.threads import Cores

Env = Mapping[str, str]
TRUE = ("1", "true", "yes")

MAX_BATCH_LIMIT = 16
MAX_WINDOW_MS = 10_000
DEFAULT_MAX_BATCH = 4  # measured: see docs/operations.md, "Batching"
DEFAULT_WINDOW_MS = 20
DEFAULT_REQUEST_TIMEOUT_S = 600.0
MAX_REQUEST_TIMEOUT_S = 24 * 3600.0
MAX_CONCURRENCY = 64
DEFAULT_PROGRESS_INTERVAL_S = 1.0
MAX_THREADS = 1024
LOG_FORMATS = ("json", "text")

ENDPOINT_ENV = "BUCKET_ENDPOINT_URL"
KEY_ID_ENV = "BUCKET_ACCESS_KEY_ID"
SECRET_ENV = "BUCKET_SECRET_ACCESS_KEY"
BUCKET_ENV = "BUCKET_NAME"
ALLOW_PRIVATE_ENV = "UIW_ALLOW_PRIVATE_URLS"
ALLOW_PRIVATE_ENV_OLD = "UIW_ALLOW_PRIVATE_IMAGE_URLS"  # the first name, kept working
URL_EXPIRES_ENV = "UIW_UPLOAD_URL_EXPIRES"
DEFAULT_URL_EXPIRES_S = 7 * 24 * 3600  # the SDK's presigned URL lifetime (604800 s), also SigV4's maximum
VOLUME_ENV = "UIW_VOLUME"  # where RunPod mounts an endpoint's network volume
DEFAULT_VOLUME = "/runpod-volume"
IMAGE_HOME_ENV = "UIW_IMAGE_HOME"  # the store baked into the image (the Dockerfile sets it)
PRECISIONS = ("fp32", "fp16", "bf16")
RECIPE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"  # as the compiler takes them (compiler.compose)


class SettingError(ValueError):
    """A setting the worker cannot use; the message names the variable and what it expects, and
    ends with a hint."""


def _raw(env: Env, name: str) -> str:
    return env.get(name, "").strip()


def _flag(env: Env, name: str) -> bool:
    return _raw(env, name).lower() in TRUE


def _whole(env: Env, name: str, low: int, high: int, hint: str) -> int | None:
    """A whole number from low to high (ASCII digits only), or None when unset."""
    raw = _raw(env, name)
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise SettingError(f"{name}={raw!r}: expected a whole number from {low} to {high}. hint: {hint}")
    return int(raw)


def _seconds(env: Env, name: str, high: float, expected: str, hint: str) -> float | None:
    """Seconds from 0 to high (finite), or None when unset."""
    raw = _raw(env, name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf") or value > high:  # NaN fails the first comparison
        raise SettingError(f"{name}={raw!r}: expected {expected}. hint: {hint}")
    return value


def memory_budget(text: str) -> int:
    """``UIW_MEMORY_BUDGET``: bytes, or a number with a unit (8GiB, 500MB, 1.5GB)."""
    try:
        value = int(TypeAdapter(ByteSize).validate_python(text.strip()))
    except ValidationError:
        value = 0
    if value <= 0:
        raise SettingError(
            f"UIW_MEMORY_BUDGET: {text!r} is not a memory size. hint: give bytes or a number with a unit, "
            "such as 8GiB, 500MB or 1.5GB; leave it unset for the device's default."
        )
    return value


def verify_mode(env: Env = os.environ) -> VerifyMode:
    """``UIW_VERIFY``: how a load checks the artifact's files against its manifest. ``memo`` (the
    default) hashes the files whose stat changed since they last hashed right; ``full`` hashes
    every file on every load (also catches bytes that rotted in place); ``off`` checks only that
    each file is there with its size."""
    value = _raw(env, "UIW_VERIFY") or "memo"
    for mode in VERIFY_MODES:
        if value == mode:
            return mode
    raise SettingError(f"UIW_VERIFY: {value!r} is not one of {', '.join(VERIFY_MODES)}. hint: unset it (memo).")


def routing_seed(env: Env = os.environ) -> int | None:
    """``UIW_ROUTING_SEED``: reproducible A/B choices between an alias's routes (tests, replays)."""
    seed = _raw(env, "UIW_ROUTING_SEED")
    if seed and not (seed.isascii() and seed.isdigit()):
        raise SettingError(f"UIW_ROUTING_SEED: {seed!r} is not a whole number. hint: unset it or give e.g. 0.")
    return int(seed) if seed else None


def progress_interval(env: Env = os.environ) -> float:
    """``UIW_PROGRESS_INTERVAL``: seconds between progress updates of the default handler (>= 0)."""
    value = _seconds(
        env,
        "UIW_PROGRESS_INTERVAL",
        float("inf"),
        "seconds, 0 or more",
        f"unset it for {DEFAULT_PROGRESS_INTERVAL_S:g} s; 0 sends every step",
    )
    return DEFAULT_PROGRESS_INTERVAL_S if value is None else value


def concurrency(env: Env = os.environ) -> int:
    """``UIW_CONCURRENCY``: jobs this worker runs at once (default 1)."""
    hint = "1 runs one job at a time; more overlap input fetching, decoding and encoding with denoising"
    return _whole(env, "UIW_CONCURRENCY", 1, MAX_CONCURRENCY, hint) or 1


def requested_threads(env: Env, cores: Cores) -> int | None:
    """``UIW_THREADS``: torch's intra-op threads as the user chose them, or None (runtime.threads
    then decides). ``cores`` is what the hint says unsetting it gives."""
    hint = (
        f"unset it and the worker uses the cores it may use ({cores.count} here, {cores.source}) "
        "divided by UIW_CONCURRENCY"
    )
    return _whole(env, "UIW_THREADS", 1, MAX_THREADS, hint)


def allow_private_urls(env: Env = os.environ) -> bool:
    """``UIW_ALLOW_PRIVATE_URLS=1`` (or its first name): image URLs may reach private and loopback
    addresses (runtime.inputs refuses them otherwise)."""
    return _flag(env, ALLOW_PRIVATE_ENV) or _flag(env, ALLOW_PRIVATE_ENV_OLD)


def log_format(env: Env = os.environ, default: str = "json") -> str:
    """``UIW_LOG_FORMAT``: json (one object per line, what log collectors parse) or text."""
    value = _raw(env, "UIW_LOG_FORMAT").lower() or default
    if value not in LOG_FORMATS:
        raise SettingError(f"UIW_LOG_FORMAT={value!r}: expected one of {', '.join(LOG_FORMATS)}. hint: json or text")
    return value


def log_level(env: Env = os.environ) -> str:
    """``UIW_LOG_LEVEL``: a level name of the logging module (default INFO)."""
    value = _raw(env, "UIW_LOG_LEVEL") or "INFO"
    # getLevelName maps a known name to its number (getLevelNamesMapping is Python 3.11+ only).
    if not isinstance(logging.getLevelName(value), int):
        raise SettingError(
            f"UIW_LOG_LEVEL={value!r}: expected a level name. hint: one of DEBUG, INFO, WARNING, ERROR (upper case)"
        )
    return value


@dataclass(frozen=True)
class BatchSettings:
    """``UIW_MAX_BATCH`` (1: never batch) and ``UIW_BATCH_WINDOW_MS`` (how long a batch waits)."""

    max_batch: int = DEFAULT_MAX_BATCH
    window_s: float = DEFAULT_WINDOW_MS / 1000

    @classmethod
    def from_env(cls, env: Env = os.environ) -> BatchSettings:
        size = _whole(env, "UIW_MAX_BATCH", 1, MAX_BATCH_LIMIT, f"unset it for {DEFAULT_MAX_BATCH}")
        window = _whole(env, "UIW_BATCH_WINDOW_MS", 0, MAX_WINDOW_MS, f"unset it for {DEFAULT_WINDOW_MS}")
        return cls(
            max_batch=DEFAULT_MAX_BATCH if size is None else size,
            window_s=(DEFAULT_WINDOW_MS if window is None else window) / 1000,
        )


@dataclass(frozen=True)
class ExecSettings:
    """How requests run: ``UIW_REQUEST_TIMEOUT`` (0: no limit), ``UIW_PREVIEW``, batching."""

    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S  # None: no limit
    preview: bool = False  # progress events carry a latent preview unless the request says
    batch: BatchSettings = field(default_factory=BatchSettings)

    @classmethod
    def from_env(cls, env: Env = os.environ) -> ExecSettings:
        timeout = _seconds(
            env,
            "UIW_REQUEST_TIMEOUT",
            MAX_REQUEST_TIMEOUT_S,
            f"seconds from 0 (no limit) to {MAX_REQUEST_TIMEOUT_S:g}",
            f"unset it for {DEFAULT_REQUEST_TIMEOUT_S:g} s",
        )
        return cls(
            request_timeout_s=DEFAULT_REQUEST_TIMEOUT_S if timeout is None else (timeout or None),
            preview=_flag(env, "UIW_PREVIEW"),
            batch=BatchSettings.from_env(env),
        )


@dataclass(frozen=True)
class Settings:
    """The service's settings: what it serves and how. ``execution`` left out comes from the
    environment (see the module docstring)."""

    artifacts: tuple[str, ...]  # UIW_ARTIFACTS: directories, recipe or alias names; the first is the default
    home: Path  # UIW_HOME
    memory_budget: int | None = None  # UIW_MEMORY_BUDGET, bytes; None: from the device (runtime.pool)
    preload: str = "1"  # UIW_PRELOAD: see runtime.service.PRELOAD_CHOICES
    routing_seed: int | None = None  # UIW_ROUTING_SEED
    execution: ExecSettings = field(default_factory=ExecSettings.from_env)

    @classmethod
    def from_env(cls, env: Env = os.environ) -> Settings:
        budget = _raw(env, "UIW_MEMORY_BUDGET")
        return cls(
            artifacts=tuple(e.strip() for e in env.get("UIW_ARTIFACTS", "").split(",") if e.strip()),
            home=store_home(env),
            memory_budget=memory_budget(budget) if budget else None,
            preload=_raw(env, "UIW_PRELOAD") or "1",
            routing_seed=routing_seed(env),
            execution=ExecSettings.from_env(env),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the worker reads at start, parsed once (runtime.__main__)."""

    service: Settings
    concurrency: int  # UIW_CONCURRENCY
    stream: bool  # UIW_STREAM: the streaming handler
    progress_interval_s: float  # UIW_PROGRESS_INTERVAL: checked here; the handler reads it per job
    threads: int | None  # UIW_THREADS; None: runtime.threads decides
    omp_num_threads: str  # OMP_NUM_THREADS as given (torch read it at import); "" when unset
    log_format: str  # UIW_LOG_FORMAT
    log_level: str  # UIW_LOG_LEVEL
    verify: VerifyMode  # UIW_VERIFY: checked here; runtime.loader reads it per load (verify_mode)
    model: ModelSpec | None = None  # UIW_RECIPE / UIW_MODEL...: a model compiled at start (runtime.bootstrap)
    image_home: Path | None = None  # UIW_IMAGE_HOME when it is not the home: baked artifacts, used first
    url_expires_s: int = DEFAULT_URL_EXPIRES_S  # UIW_UPLOAD_URL_EXPIRES: checked here; runtime.upload reads it per use

    @classmethod
    def from_env(cls, cores: Cores, env: Env = os.environ) -> WorkerSettings:
        """Raises SettingError for the first bad value. ``cores``: runtime.threads.usable_cores(),
        named in the UIW_THREADS hint."""
        return cls(
            service=Settings.from_env(env),
            concurrency=concurrency(env),
            stream=_flag(env, "UIW_STREAM"),
            progress_interval_s=progress_interval(env),
            threads=requested_threads(env, cores),
            omp_num_threads=_raw(env, "OMP_NUM_THREADS"),
            log_format=log_format(env),
            log_level=log_level(env),
            verify=verify_mode(env),
            model=model_spec(env),
            image_home=image_home(env),
            url_expires_s=url_expires(env),
        )


@dataclass(frozen=True)
class Bucket:
    """S3-compatible storage for the images, configured as the RunPod SDK uploader is (runtime.upload)."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    name: str | None  # None: the SDK's default, chosen per upload (the month changes)
    region: str | None

    def bucket_name(self) -> str:
        return self.name or time.strftime("%m-%y")  # the SDK's default bucket


def bucket(env: Env = os.environ) -> Bucket | None:
    """``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID``, ``BUCKET_SECRET_ACCESS_KEY``, ``BUCKET_NAME``:
    the bucket to upload to, or None when none is configured (replies carry data URIs). Raises
    SettingError for a partial configuration: never a silent fallback."""
    endpoint = _raw(env, ENDPOINT_ENV)
    key_id, secret = _raw(env, KEY_ID_ENV), _raw(env, SECRET_ENV)
    if not endpoint:
        if key_id or secret:
            raise SettingError(
                f"{KEY_ID_ENV}/{SECRET_ENV} are set but {ENDPOINT_ENV} is not, so images cannot be uploaded. "
                f"hint: set {ENDPOINT_ENV} (e.g. https://s3.us-east-1.amazonaws.com), or unset the keys to "
                "receive images as data URIs."
            )
        return None
    missing = [name for name, value in ((KEY_ID_ENV, key_id), (SECRET_ENV, secret)) if not value]
    if missing:
        raise SettingError(
            f"{ENDPOINT_ENV} is set ({endpoint}) but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not, so images cannot be uploaded. "
            f"hint: set {KEY_ID_ENV} and {SECRET_ENV} to the bucket's keys, "
            f"or unset {ENDPOINT_ENV} to receive images as data URIs."
        )
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError(
            f"{ENDPOINT_ENV}: {endpoint!r} is not an http(s) URL. hint: give the S3 endpoint, e.g. "
            "https://s3.us-east-1.amazonaws.com or https://<account>.r2.cloudflarestorage.com"
        )
    return Bucket(endpoint.rstrip("/"), key_id, secret, _raw(env, BUCKET_ENV) or None, region_of(endpoint))


S3_CONFIG_FIELDS = {"accessId": "the key id", "accessSecret": "the secret key", "bucketName": "the bucket"}


def job_bucket(config: object) -> Bucket:
    """A job's ``s3Config`` (RunPod's per-job bucket: ``accessId``, ``accessSecret``,
    ``bucketName``, ``endpointUrl``), used instead of the environment's bucket for that job."""
    if not isinstance(config, dict):
        raise SettingError("s3Config: expected an object with accessId, accessSecret, bucketName and endpointUrl")
    name = config.get("bucketName")
    bucket_text = f" (bucket {name!r})" if isinstance(name, str) and name else ""
    unknown = sorted(set(config) - {*S3_CONFIG_FIELDS, "endpointUrl"})
    missing = [k for k in (*S3_CONFIG_FIELDS, "endpointUrl") if not isinstance(config.get(k), str) or not config[k]]
    if unknown or missing:
        what = f"missing or not a string: {', '.join(missing)}" if missing else f"unknown fields {', '.join(unknown)}"
        raise SettingError(
            f"s3Config{bucket_text}: {what}. hint: RunPod's s3Config has accessId, accessSecret, bucketName and "
            "endpointUrl (e.g. https://<account>.r2.cloudflarestorage.com), all strings"
        )
    endpoint = config["endpointUrl"].strip()
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError(
            f"s3Config{bucket_text}: endpointUrl {endpoint!r} is not an http(s) URL. hint: give the S3 endpoint, "
            "e.g. https://s3.us-east-1.amazonaws.com"
        )
    return Bucket(endpoint.rstrip("/"), config["accessId"], config["accessSecret"], name, region_of(endpoint))


def region_of(endpoint_url: str) -> str | None:
    """The region in an endpoint URL, as the SDK reads it (rp_upload.extract_region_from_url) for
    AWS/Backblaze (``[bucket.]s3.<region>.…``) and DigitalOcean Spaces (``<region>.digitaloceanspaces.com``);
    None otherwise (boto3 then takes AWS_DEFAULT_REGION, else signs for us-east-1)."""
    labels = (urlsplit(endpoint_url).hostname or "").split(".")
    if "s3" in labels[:-2]:
        region = labels[labels.index("s3") + 1]
        return None if region == "amazonaws" else region
    if labels[-2:] == ["digitaloceanspaces", "com"] and len(labels) >= 3:
        return labels[-3]
    return None


def volume(env: Env = os.environ) -> Path | None:
    """The endpoint's network volume (``UIW_VOLUME``, default /runpod-volume) when it is mounted."""
    path = Path(_raw(env, VOLUME_ENV) or DEFAULT_VOLUME)
    return path if path.is_dir() else None


def store_home(env: Env = os.environ) -> Path:
    """The store: ``UIW_HOME``; else ``<volume>/uiw`` when a network volume is mounted, shared by
    every worker of the endpoint; else the image's store (``UIW_IMAGE_HOME``); else DEFAULT_HOME."""
    if given := _raw(env, "UIW_HOME"):
        return Path(given).expanduser()
    if (mounted := volume(env)) is not None:
        return mounted / "uiw"
    return Path(_raw(env, IMAGE_HOME_ENV) or DEFAULT_HOME).expanduser()


def image_home(env: Env = os.environ) -> Path | None:
    """The image's own store when it is not the home: its artifacts are served before the home's."""
    raw = _raw(env, IMAGE_HOME_ENV)
    if not raw or Path(raw).expanduser() == store_home(env):
        return None
    return Path(raw).expanduser()


def url_expires(env: Env = os.environ) -> int:
    """``UIW_UPLOAD_URL_EXPIRES``: seconds an uploaded image's presigned URL stays valid."""
    hint = f"unset it for {DEFAULT_URL_EXPIRES_S} s (7 days, the most S3's signatures allow)"
    value = _whole(env, URL_EXPIRES_ENV, 1, DEFAULT_URL_EXPIRES_S, hint)
    return DEFAULT_URL_EXPIRES_S if value is None else value


@dataclass(frozen=True)
class LoraSpec:
    source: str
    scale: float | None  # None: the recipe's default


@dataclass(frozen=True)
class ModelSpec:
    """A model named by the environment, compiled at start (runtime.bootstrap, in a child
    process): ``UIW_RECIPE`` (YAML text, a file or an http(s) URL) or the shorthand ``UIW_MODEL``
    (+ ``UIW_LORAS``); ``UIW_PRECISION`` applies to either; ``UIW_RECIPE_NAME`` names it."""

    name: str
    recipe: str | None  # UIW_RECIPE as given
    model: str | None  # UIW_MODEL: any source form the compiler takes
    loras: tuple[LoraSpec, ...] = ()
    precision: str | None = None


def _lora(item: str) -> LoraSpec:
    """``source[:scale]``: the last ``:`` part is a scale only when it is a number (sources hold
    colons: hf://, civitai://, AIRs)."""
    head, sep, tail = item.rpartition(":")
    try:
        scale = float(tail) if sep and head else None
    except ValueError:
        scale = None
    if scale is not None and not -10 <= scale <= 10:  # also refuses nan and inf
        raise SettingError(f"UIW_LORAS: {item!r}: the scale {tail} is out of range. hint: a number from -10 to 10")
    return LoraSpec(head, scale) if scale is not None else LoraSpec(item, None)


def _file_stem(recipe: str) -> str | None:
    """A recipe file's (or URL's) name without ``.yaml``, when UIW_RECIPE names one."""
    if not recipe or "\n" in recipe or recipe.lstrip().startswith("{"):
        return None
    stem = recipe.rstrip("/").rsplit("/", 1)[-1].split("?")[0].removesuffix(".yaml").removesuffix(".yml")
    return stem if re.fullmatch(RECIPE_NAME, stem) else None


def model_spec(env: Env = os.environ) -> ModelSpec | None:
    """The environment's model, or None when it names none. Checks the shape only; the recipe
    itself is the compiler's to check (its errors become every job's error reply)."""
    recipe, model = _raw(env, "UIW_RECIPE"), _raw(env, "UIW_MODEL")
    loras_raw, precision = _raw(env, "UIW_LORAS"), _raw(env, "UIW_PRECISION").lower() or None
    if recipe and model:
        raise SettingError(
            "UIW_RECIPE and UIW_MODEL are both set. hint: UIW_MODEL (+ UIW_LORAS) is a shorthand for a "
            "one-model recipe; put the model and its LoRAs in UIW_RECIPE instead, or unset it"
        )
    if not (recipe or model):
        return None  # UIW_LORAS, UIW_PRECISION alone mean nothing (a template's defaults set them)
    name = _raw(env, "UIW_RECIPE_NAME") or _file_stem(recipe) or "model"
    if loras_raw and recipe:
        raise SettingError("UIW_LORAS goes with UIW_MODEL only. hint: list the LoRAs in UIW_RECIPE's `loras:`")
    if precision is not None and precision not in PRECISIONS:
        raise SettingError(f"UIW_PRECISION={precision!r}: expected one of {', '.join(PRECISIONS)}. hint: fp16 on a GPU")
    if not re.fullmatch(RECIPE_NAME, name):
        raise SettingError(
            f"UIW_RECIPE_NAME={name!r}: not a recipe name. hint: letters, digits, '_', '.', '-' (at most 128)"
        )
    loras = tuple(_lora(x.strip()) for x in loras_raw.split(",") if x.strip())
    return ModelSpec(name, recipe or None, model or None, loras, precision)
