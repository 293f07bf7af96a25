"""The request fields of a generic artifact: worker-sdxl's, less those its pipeline does not take,
plus the pipeline's own plain parameters (runtime.artifact.CallParam) with their defaults and
bounds. Used by runtime.schema.request_model, so validation and ``describe`` follow the same
fields. A field the pipeline does not take is then an unknown key, refused in worker-sdxl's words.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from runtime.artifact import CallParam

# worker-sdxl fields that are always there: they are ours (seed, scheduler, the image tasks'
# inputs, the reply's form), not the pipeline's; the refiner ones are accepted and ignored.
OURS = frozenset(
    {
        "prompt",
        "seed",
        "scheduler",
        "strength",
        "image_url",
        "mask_url",
        "refiner_inference_steps",
        "high_noise_frac",
        "loras",
        "controlnets",
        "image_format",
        "quality",
    }
)
PYTHON_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
MAX_TEXT = 10_000  # as runtime.schema.MAX_PROMPT_CHARS


def extra_field(param: CallParam) -> tuple[Any, Any]:
    """A pipeline parameter as a request field: its type (strict), bounds and the pipeline's default."""
    bounds: dict[str, Any] = {}
    if param.minimum is not None:
        bounds["ge"] = int(param.minimum) if param.type == "int" else param.minimum
    if param.maximum is not None:
        bounds["le"] = int(param.maximum) if param.type == "int" else param.maximum
    if param.type == "str":
        bounds["max_length"] = MAX_TEXT
    description = (param.description or f"{param.name}: a parameter of the pipeline") + " (the pipeline's own)"
    return (
        PYTHON_TYPES[param.type] | None,
        Field(None, description=description, json_schema_extra={"default": param.default}, **bounds),
    )


def generic_fields(fields: dict[str, Any], spec: Any) -> dict[str, Any]:
    """``fields`` (runtime.schema's, for a RequestSpec ``spec`` with ``mapped`` set) for a generic
    artifact's pipeline."""
    kept = {n: f for n, f in fields.items() if n in OURS or n in spec.mapped}
    return {**kept, **{p.name: extra_field(p) for p in spec.extras}}
