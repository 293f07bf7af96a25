"""One component from one single file, through diffusers' ``from_single_file`` with a local config
folder (nothing reaches the Hub); shapes that do not fit the config become a UserError."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compiler.errors import UserError
from compiler.finite import require_finite_file
from compiler.flux_bfl import is_bfl_file, load_transformer
from compiler.sources import Fetched

# diffusers' conversion and loading errors; NotImplementedError: keys the file lacks leave meta
# tensors that cannot be copied.
LOAD_ERRORS = (ValueError, RuntimeError, KeyError, NotImplementedError)


def linked(scratch: Path, fetched: Fetched, name: str) -> str:
    """The fetched file as ``scratch/name/model.safetensors``: diffusers picks the reader by file
    extension, and blobs have none (fetch checked the format)."""
    (blob,) = fetched.files.values()
    path = scratch / name / "model.safetensors"
    path.parent.mkdir(parents=True)
    os.symlink(blob.resolve(), path)
    return str(path)


def load_component(
    cls: Any, fetched: Fetched, scratch: Path, name: str, config: Path, where: str | None, what: str, hint: str
) -> Any:
    """``cls.from_single_file`` of the file with ``config``; with ``where``, a file that does not
    fit (``what`` it should have fitted) or holds NaN/Inf weights is a UserError there; without,
    the caller checked the weights and a load error propagates."""
    if where is not None:
        (blob,) = fetched.files.values()
        require_finite_file(blob, where, "file")
    try:
        if cls.__name__ == "FluxTransformer2DModel" and is_bfl_file(blob := next(iter(fetched.files.values()))):
            # diffusers' converter splits FLUX at FLUX.1's widths only: compiler.flux_bfl
            return load_transformer(cls, blob, str(config), None, None)
        return cls.from_single_file(linked(scratch, fetched, name), config=str(config), local_files_only=True)
    except LOAD_ERRORS as e:
        if where is None:
            raise
        first = str(e).splitlines()[0][:400]
        raise UserError.one(where, f"this file does not fit {what}: {first}", hint) from None


# Components a pipeline runs without that some single files leave out: SD 3's T5 (the
# "incl_clips" releases carry CLIP-L and OpenCLIP-G only). diffusers' own answer is to pass them
# as None (the pipeline then conditions on zeros where T5's tokens would be); the key below
# marks a file that holds the component. pipeline class -> ((components), marker key)
OPTIONAL_IN_FILE: dict[str, tuple[tuple[str, ...], str]] = {
    "StableDiffusion3Pipeline": (("text_encoder_3", "tokenizer_3"), "text_encoders.t5xxl.transformer.shared.weight"),
}


def left_out_of_file(pipeline_class: str, path: Path) -> dict[str, None]:
    """The optional components the file at ``path`` leaves out, as from_single_file's ``None``
    arguments (reads the header only)."""
    from compiler.headers import read_header

    optional = OPTIONAL_IN_FILE.get(pipeline_class)
    if optional is None:
        return {}
    components, marker = optional
    return {} if marker in read_header(path)[0] else dict.fromkeys(components)


def tie_and_check(pipe: Any) -> None:
    """diffusers' single-file T5 loader (FLUX and SD 3 all-in-one files) fills T5's ``shared``
    embedding but not the encoder's ``embed_tokens``, which transformers 5 ties to it only in
    ``tie_weights``: left so, it stays on the meta device and the first prompt fails. Every
    transformers model is tied; a tensor still on the meta device is one the file lacks."""
    from transformers import PreTrainedModel

    for name, component in pipe.components.items():
        if isinstance(component, PreTrainedModel):
            component.tie_weights()
        if hasattr(component, "state_dict"):
            left = [k for k, v in component.state_dict().items() if v.is_meta]
            if left:
                raise ValueError(f"the file holds no weights for {name}: {', '.join(left[:3])}")
