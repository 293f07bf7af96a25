"""The environment's model (runtime.settings.ModelSpec) -> the text of a recipe file.

``UIW_RECIPE`` is used as it is: YAML text (it holds a newline or starts with ``{``), an http(s)
URL (fetched once, bounded) or a file. ``UIW_MODEL`` (+ ``UIW_LORAS``) becomes a one-model recipe:
a source that names one file (CivitAI, AIRs, URLs, ``hf://org/repo/file``, a local file) is its
``checkpoint:``, a whole pipeline (``hf://org/repo``, ``builtin:``, a local folder) its ``base:``.
The recipe is written as JSON, which YAML reads, so the runtime needs no YAML writer; the
compiler checks every field (its errors become the jobs' error replies).

RunPod's cached models: an endpoint may list Hub models that RunPod downloads onto the host
before the worker starts, into ``/runpod-volume/huggingface-cache/hub`` (the huggingface_hub cache
layout). An ``hf://`` source already there is given to the compiler as that local folder or file,
so nothing is downloaded again (it is pinned by the sha256 of its files, as any local source).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from runtime.settings import Env, ModelSpec, SettingError

MAX_RECIPE_BYTES = 64 * 1024  # the compiler's own bound on a recipe file
FETCH_TIMEOUT_S = 30
HF_CACHE_SUBDIR = "huggingface-cache/hub"  # under the network volume; RunPod's cached models


def recipe_text(spec: ModelSpec, volume: Path | None, env: Env) -> str:
    """The recipe file's text. Raises SettingError when UIW_RECIPE names nothing readable."""
    if spec.recipe is not None:
        return _given_recipe(spec.recipe)
    assert spec.model is not None
    cache = volume / HF_CACHE_SUBDIR if volume is not None else None
    fields: dict[str, Any] = {role_of(spec.model): cached_source(spec.model, cache)}
    if spec.loras:
        fields["loras"] = [
            {"source": cached_source(x.source, cache), **({"scale": x.scale} if x.scale is not None else {})}
            for x in spec.loras
        ]
    return json.dumps(fields, indent=2) + "\n"


def _given_recipe(given: str) -> str:
    if "\n" in given or given.lstrip().startswith("{"):
        return given
    if given.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(given, timeout=FETCH_TIMEOUT_S) as resp:
                data: bytes = resp.read(MAX_RECIPE_BYTES + 1)
        except OSError as e:
            raise SettingError(f"UIW_RECIPE: {given} could not be read: {e}. hint: check the URL") from e
    else:
        path = Path(given).expanduser()
        try:
            data = path.read_bytes()[: MAX_RECIPE_BYTES + 1]
        except OSError as e:
            raise SettingError(
                f"UIW_RECIPE: {given!r} is neither YAML text nor a readable file ({e.strerror}). "
                "hint: give the recipe's text, a path inside the image or on the volume, or an https URL"
            ) from e
    if len(data) > MAX_RECIPE_BYTES:
        raise SettingError(f"UIW_RECIPE: {given} is over {MAX_RECIPE_BYTES} bytes. hint: a recipe is a few lines")
    return data.decode("utf-8", errors="replace")


def role_of(source: str) -> str:
    """``base`` for a whole pipeline, ``checkpoint`` for one file (as compiler.uri tells them)."""
    if source.startswith("builtin:"):
        return "base"
    if source.startswith("hf://"):
        repo_and_path = source[len("hf://") :].split("@")[0].strip("/")
        return "checkpoint" if repo_and_path.count("/") >= 2 else "base"
    if "://" in source or source.startswith("urn:"):
        return "checkpoint"  # civitai://, AIRs, https:// URLs: one file each
    return "base" if Path(source).expanduser().is_dir() else "checkpoint"


def cached_source(source: str, cache: Path | None) -> str:
    """An ``hf://org/repo[/path][@rev]`` source already in RunPod's model cache -> the local
    folder or file; anything else unchanged."""
    if cache is None or not source.startswith("hf://"):
        return source
    body, _, rev = source[len("hf://") :].partition("@")
    parts = body.strip("/").split("/")
    if len(parts) < 2:
        return source
    repo = cache / f"models--{parts[0]}--{parts[1]}"
    rev = rev or "main"
    ref = repo / "refs" / rev
    try:
        commit = ref.read_text().strip() if ref.is_file() else rev
    except OSError:
        return source
    local = repo / "snapshots" / commit / "/".join(parts[2:])
    return str(local) if local.exists() and commit else source
