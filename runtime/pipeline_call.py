"""A generic artifact's request -> its pipeline's ``__call__`` arguments, and the call's output ->
what the reply carries. The one place that knows how a generic pipeline is called and what it
returns: image pipelines give ``.images``, video pipelines ``.frames`` (one frame list per video).

The argument names come from the manifest's call schema (runtime.artifact.CallSchema), which the
compiler read from the pipeline class: worker-sdxl's fields under the names the pipeline takes,
then the pipeline's own parameters the request set. What the request left out is left out of the
call too, so the pipeline's own defaults apply exactly as in a plain diffusers call.
"""

from __future__ import annotations

import inspect
from typing import Any

from runtime.schema import GenerationRequest

_ACCEPTED: dict[Any, frozenset[str] | None] = {}  # pipeline class -> accepted(): computed once per class


def accepted(cls: Any) -> frozenset[str] | None:
    """The keyword names ``cls.__call__`` takes, or None when it takes any (``**kwargs``)."""
    if cls not in _ACCEPTED:
        fn = cls.__call__
        while hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        _ACCEPTED[cls] = None if takes_any else frozenset(params)
    return _ACCEPTED[cls]


def generic_arguments(pipeline: Any, request: GenerationRequest) -> dict[str, Any]:
    """The call's arguments, less the generator and output_type."""
    call = request.call
    if call is None:
        raise ValueError("generic_arguments needs a generic artifact's request (request.call)")
    m = call.mapped
    given: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.steps,
        "num_images": request.num_images,
        "width": request.width,
        "height": request.height,
        "guidance_scale": request.guidance_scale,
        "negative_prompt": request.negative_prompt,
    }
    args = {m[field]: value for field, value in given.items() if field in m and value is not None}
    if request.task in ("img2img", "inpaint"):
        if request.image is None:
            raise ValueError(f"a {request.task} request without its decoded image (runtime.inputs.attach_images)")
        args.update(image=request.image, strength=request.strength)
    if request.task == "inpaint":
        args["mask_image"] = request.mask
    args.update(request.params)
    # A sibling pipeline (img2img, inpaint) may not take every parameter its txt2img class does.
    names = accepted(type(pipeline))
    return args if names is None else {k: v for k, v in args.items() if k in names}


def takes_step_callback(pipeline: Any) -> bool:
    names = accepted(type(pipeline))
    return names is None or "callback_on_step_end" in names


def pipeline_output(output: Any) -> list[Any]:
    """A pipeline call's result as one entry per output: a PIL image, or (video pipelines) a
    video's list of PIL frames."""
    frames = getattr(output, "frames", None)
    if frames is not None:
        return list(frames)
    return list(output.images)
