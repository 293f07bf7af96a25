"""Pickled checkpoints (.ckpt, .pt, .bin), only where a recipe says `allow_pickle: true`: their
tensors are read with ``torch.load(weights_only=True)`` (an unpickler that builds tensors and plain
containers and refuses every other global, so nothing in the file can run) and written to the
store as safetensors, which is all any later stage ever reads. Each pickle is converted once: its
marker (``Store.pickle_marker``, on disk ``blobs/converted/<sha256>``) names the blob made from it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compiler.errors import UserError
from compiler.store import Store
from runtime.artifact import sha256_file

log = logging.getLogger(__name__)


def load_weights_only(path: Path, name: str, where: str, code_hint: str, unreadable: str, hint: str) -> Any:
    """``torch.load(weights_only=True)`` of the file: a pickle that needs code to unpickle, or a
    damaged or foreign file, is a UserError at ``where`` (nothing in the file ran)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0][:300]
        raise UserError.one(
            where, f"{name} needs code to unpickle, so it was not loaded ({reason}); nothing in it ran", code_hint
        ) from None
    except Exception as e:  # a damaged or foreign file
        raise UserError.one(where, f"{unreadable} ({type(e).__name__}: {str(e)[:200]})", hint) from None


def convert(path: Path, name: str, where: str, store: Store) -> Path:
    """The safetensors blob holding the pickle's tensors (converted once per source file)."""

    import torch
    from safetensors.torch import save_file

    source_hex = sha256_file(path)
    marker = store.pickle_marker(source_hex)  # holds the sha256 of the safetensors blob made from it
    if marker.is_file() and store.blob_path(marker.read_text().strip()).is_file():
        return store.blob_path(marker.read_text().strip())
    loaded = load_weights_only(
        path,
        name,
        where,
        "a checkpoint that is only weights loads with weights_only; ask for the .safetensors file instead",
        f"{name}: not a readable PyTorch checkpoint",
        "check the file",
    )
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise UserError.one(where, f"{name} holds a {type(loaded).__name__}, not a state dict", "check the file")
    # Nested dicts of tensors (an A1111 embedding's string_to_param: {"*": tensor}) become dotted
    # keys, as safetensors has no nesting: "string_to_param.*".
    flat = dict(_flatten(state))
    tensors = {k: v.contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(k for k, v in flat.items() if not isinstance(v, torch.Tensor))
    if skipped:
        log.info("%s: left out %d non-tensor entries (%s)", name, len(skipped), ", ".join(skipped[:5]))
    if not tensors:
        raise UserError.one(where, f"{name} holds no tensors", "check the file")
    tmp = store.partial_path(f"converted-{source_hex}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage in a pickle; safetensors wants each tensor on its own.
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp))
    digest = sha256_file(tmp)
    dest = store.blob_path(digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")
    log.info("converted %s (%d tensors) to safetensors %s", name, len(tensors), digest)
    return dest


def _flatten(d: dict[Any, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
