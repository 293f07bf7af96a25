"""The frame bound of a video pipeline's requests: ``limits.max_frames`` from the recipe, else the
pipeline's own default ``num_frames`` (the clip length its model is made for), written into the
call schema's ``num_frames`` parameter so that validation and ``describe`` both carry it.

A bound below the pipeline's own default is refused at build: a request that leaves
``num_frames`` out runs the pipeline's default (the generic path passes only what a request set),
which would then exceed the bound the recipe asked for.
"""

from __future__ import annotations

from compiler.errors import Problem, UserError
from runtime.artifact import MAX_FRAMES, CallSchema, Limits

FRAMES_PARAM = "num_frames"


def bound_frames(recipe: str, pipeline_class: str, call: CallSchema, limits: Limits) -> tuple[CallSchema, Limits]:
    """``call`` with its num_frames bounded, and ``limits`` with the bound recorded. Raises UserError
    for a bound on a pipeline that makes no video, or below the pipeline's own default."""
    where = f"recipe {recipe}: limits.max_frames"
    param = next((p for p in call.extras if p.name == FRAMES_PARAM), None)
    if call.output != "frames" or param is None:
        if limits.max_frames is not None:
            raise UserError(
                [Problem(where, f"{pipeline_class} makes images, not videos (no num_frames)", "remove max_frames")]
            )
        return call, limits
    own = param.default if isinstance(param.default, int) and not isinstance(param.default, bool) else None
    bound = limits.max_frames or min(own or MAX_FRAMES, MAX_FRAMES)
    if own is not None and bound < own:
        raise UserError(
            [
                Problem(
                    where,
                    f"{bound} is below {pipeline_class}'s own default num_frames ({own}), which a request without "
                    "num_frames runs",
                    f"set max_frames to at least {own}",
                )
            ]
        )
    low = param.minimum if param.minimum is not None else 1.0
    bounded = param.model_copy(update={"minimum": low, "maximum": float(bound)})
    extras = tuple(bounded if p.name == FRAMES_PARAM else p for p in call.extras)
    return call.model_copy(update={"extras": extras}), limits.model_copy(update={"max_frames": bound})
