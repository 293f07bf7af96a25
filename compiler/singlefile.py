"""One component from one single file, through diffusers' ``from_single_file`` with a local config
folder (nothing reaches the Hub); shapes that do not fit the config become a UserError."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compiler.errors import UserError
from compiler.finite import require_finite_file
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
        return cls.from_single_file(linked(scratch, fetched, name), config=str(config), local_files_only=True)
    except LOAD_ERRORS as e:
        if where is None:
            raise
        first = str(e).splitlines()[0][:400]
        raise UserError.one(where, f"this file does not fit {what}: {first}", hint) from None


def tie_meta_weights(pipe: Any) -> None:
    """Re-tie the shared weights a single-file load left on the meta device. diffusers loads T5
    (SD 3's text_encoder_3) into an empty model; the files store its embedding once, as
    ``shared.weight``, and with transformers 5 the tied ``encoder.embed_tokens`` stays meta (it
    fails at the first prompt). transformers' own ``tie_weights`` ties it back."""
    for component in pipe.components.values():
        tie = getattr(component, "tie_weights", None)
        if tie is not None and any(p.is_meta for p in component.parameters()):
            tie()


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
