"""txt2img and img2img through an inpainting model's pipeline, with a full (all-white) mask.

An inpainting model (SD 1.x/2.x and SDXL with a 9-channel UNet, FLUX.1 Fill) is served through its
inpaint pipeline alone (the compiler's ``compiler.tasks``), whose denoiser always takes a mask and a
masked image. Its artifact maps txt2img and img2img to that pipeline too; such a request gets a
mask covering the whole image, as AUTOMATIC1111 serves these models:

- img2img: the request's image, the full mask, the request's strength: the whole image is
  re-noised to the strength and regenerated, conditioned on a fully masked image (A1111's
  img2img with ``inpainting_mask_weight`` 1).
- txt2img: strength 1.0, so the pipeline starts from pure noise and never uses the init image's
  latents; the full mask zeroes the masked-image conditioning (0 in [-1, 1], mid-gray), which is
  exactly A1111's txt2img conditioning for inpainting models (a 0.5-gray image and a mask of
  ones). The init image is mid-gray so that what the pipeline is given is what it conditions on.
"""

from __future__ import annotations

import inspect
from typing import Any

from runtime.schema import GenerationRequest

TXT2IMG_STRENGTH = 1.0
GRAY = (128, 128, 128)


def needs_full_mask(pipeline: Any, task: str) -> bool:
    """A txt2img or img2img request on a pipeline that takes a mask: an inpainting model's."""
    return task in ("txt2img", "img2img") and "mask_image" in inspect.signature(type(pipeline).__call__).parameters


def full_mask_arguments(request: GenerationRequest) -> dict[str, Any]:
    """The image, mask and strength a txt2img or img2img request runs with on an inpaint pipeline."""
    from PIL import Image

    size = (request.width, request.height)
    if request.task == "img2img":
        if request.image is None:
            raise ValueError("an img2img request without its decoded image (runtime.inputs.attach_images)")
        image, strength = request.image, request.strength
    else:
        image, strength = Image.new("RGB", size, GRAY), TXT2IMG_STRENGTH
    return {"image": image, "mask_image": Image.new("L", image.size, 255), "strength": strength}
