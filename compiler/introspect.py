"""A diffusers pipeline class -> the request schema of a generic artifact, read once at build.

The ``__call__`` signature says which of worker-sdxl's fields the pipeline takes and under which
name, and which other parameters are plain values (numbers, strings, booleans) a request may set,
with the pipeline's own defaults; its docstring describes each and, where it says so, bounds it.
Tensors, callables, latents, embeddings and images are never exposed: requests carry JSON.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any, get_args, get_origin

from runtime.artifact import CallParam, CallSchema, ParamType

# worker-sdxl field -> the __call__ parameters that take it, first match wins.
MAPPED: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "negative_prompt": ("negative_prompt",),
    "width": ("width",),
    "height": ("height",),
    "num_inference_steps": ("num_inference_steps",),
    "guidance_scale": ("guidance_scale",),
    "num_images": ("num_images_per_prompt", "num_videos_per_prompt"),
}
# Parameters that are plain-typed but no request may set: the reply's form is ours, the old
# callback API is superseded, the image tasks' inputs come through image_url/mask_url/strength.
NEVER = frozenset(
    {"output_type", "return_dict", "callback_steps", "strength", "image", "mask_image", "generator", "seed"}
)
NEVER_PARTS = ("embeds", "latents", "callback", "kwargs", "mask", "image", "generator")
PLAIN: dict[Any, ParamType] = {bool: "bool", int: "int", float: "float", str: "str"}
# Bounds the docstrings do not state in a form read below, by parameter name.
KNOWN_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "guidance_rescale": (0.0, 1.0),
    "eta": (0.0, 1.0),
    "num_frames": (1.0, None),
    "fps": (1.0, None),
    "frame_rate": (1.0, None),
    "true_cfg_scale": (0.0, None),
    "cfg_trunc_ratio": (0.0, 1.0),
}
_BETWEEN = re.compile(r"between\s+(-?\d+(?:\.\d+)?)\s+and\s+(-?\d+(?:\.\d+)?)")
_RANGE = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")
MAX_DESCRIPTION = 400


def call_function(cls: type) -> Any:
    """The pipeline's __call__ as written, under the decorators that wrap it without functools.wraps."""
    fn = cls.__call__
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(call_function(cls)).parameters.items() if n != "self"}


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # a forward reference diffusers does not resolve: such parameters stay hidden
        return {}


def plain_type(annotation: Any) -> ParamType | None:
    """bool/int/float/str, optionally with None; anything else (a union with lists or tensors) is not plain."""
    if annotation in PLAIN:
        return PLAIN[annotation]
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in PLAIN:
            return PLAIN[args[0]]
    return None


def docstring_args(doc: str | None) -> dict[str, str]:
    """``name -> description`` from a diffusers docstring's ``Args:`` block (Google style)."""
    out: dict[str, str] = {}
    name, indent, lines = None, 0, list[str]()
    for line in (doc or "").splitlines():
        m = re.match(r"^(\s*)(\w+) \(", line)
        if m and (name is None or len(m.group(1)) <= indent):
            if name is not None:
                out[name] = " ".join(lines)
            name, indent, lines = m.group(2), len(m.group(1)), []
        elif name is not None and line.strip():
            if len(line) - len(line.lstrip()) <= indent:
                out[name], name = " ".join(lines), None
            else:
                lines.append(line.strip())
    if name is not None:
        out[name] = " ".join(lines)
    return out


def _bounds(name: str, kind: ParamType, description: str, default: Any) -> tuple[float | None, float | None]:
    if name in KNOWN_BOUNDS:
        return KNOWN_BOUNDS[name]
    if name == "max_sequence_length" and isinstance(default, int):
        return 1.0, float(default)  # the text encoder was trained to this length: shorter only
    if kind in ("int", "float"):
        for pattern in (_BETWEEN, _RANGE):
            if m := pattern.search(description):
                return float(m.group(1)), float(m.group(2))
    return None, None


def _exposed(name: str, param: inspect.Parameter, hint: Any, docs: dict[str, str]) -> CallParam | None:
    kind = plain_type(hint)
    if kind is None or name in NEVER or any(part in name for part in NEVER_PARTS):
        return None
    if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return None
    default = None if param.default is inspect.Parameter.empty else param.default
    if default is not None and not isinstance(default, bool | int | float | str):
        return None
    description = docs.get(name, "")[:MAX_DESCRIPTION]
    low, high = _bounds(name, kind, description, default)
    return CallParam(name=name, type=kind, default=default, minimum=low, maximum=high, description=description)


def call_schema(cls: type, size_multiple: int, schedulers: tuple[str, ...]) -> CallSchema:
    """The request schema of a generic artifact whose pipeline is ``cls``."""
    fn = call_function(cls)
    params = parameters(cls)
    hints = _hints(fn)
    mapped = {
        field: next(n for n in names if n in params) for field, names in MAPPED.items() if set(names) & set(params)
    }
    # guidance_scale that defaults to None is not CFG's scale (Qwen-Image: the distilled-guidance
    # input of models that have one): exposed as the pipeline's own parameter, not worker-sdxl's.
    if "guidance_scale" in mapped and not isinstance(params["guidance_scale"].default, int | float):
        del mapped["guidance_scale"]
    docs = docstring_args(fn.__doc__)
    taken = set(mapped.values())
    extras = tuple(
        p
        for n, param in params.items()
        if n not in taken and (p := _exposed(n, param, hints.get(n, param.annotation), docs)) is not None
    )
    video = "num_frames" in params or "num_videos_per_prompt" in params
    return CallSchema(
        mapped=mapped,
        extras=extras,
        size_multiple=size_multiple,
        schedulers=schedulers,
        output="frames" if video else "images",
        step_callback="callback_on_step_end" in params,
    )


def own_default(cls: type, name: str) -> Any:
    """A __call__ parameter's default, or None."""
    param = parameters(cls).get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default
