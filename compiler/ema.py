"""EMA-only UNet files -> the LDM names diffusers' single-file converter reads.

LDM's trainer keeps an exponential moving average of the UNet (``LitEma``) as buffers named
``model_ema.`` + the UNet's LDM name without ``model.`` and without its dots
(``model.diffusion_model.input_blocks.1.1.norm.weight`` ->
``model_ema.diffusion_modelinput_blocks11normweight``). Checkpoints that kept only the EMA
("ema-only" / "emaonly" releases) are what A1111 and diffusers run in place of the raw weights
(``extract_ema=True`` in diffusers' converter): the average is the model. diffusers converts only
files that hold ``model.diffusion_model.*`` names, so the names are restored here first.

Removing the dots lost where they were; LDM's UNet names come from a small vocabulary (module
names and indices), so they are read back token by token. The digit runs are the only ambiguity:
after ``input_blocks``/``output_blocks`` come a block index and a one-digit layer index
(``111`` is ``11.1``); after ``label_emb`` two one-digit indices; elsewhere one index.
"""

from __future__ import annotations

import re
from pathlib import Path

from compiler.errors import UserError
from compiler.headers import read_header
from compiler.sources import Fetched

PREFIX = "model_ema."
UNET = "model.diffusion_model."
# LitEma's own buffers: the decay and the update count, not weights.
BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
# Every module name in LDM's (and SGM's) UNet, longest first so that a name never stops at a
# shorter one it starts with (out_layers before out, norm1 before norm).
_WORDS = sorted(
    (  # noqa: SIM905 - one line of LDM's module names reads better than a column of 31
        "diffusion_model input_blocks middle_block output_blocks time_embed label_emb out in_layers "
        "emb_layers out_layers skip_connection op conv norm proj_in proj_out transformer_blocks attn1 "
        "attn2 to_q to_k to_v to_out ff net proj norm1 norm2 norm3 weight bias"
    ).split(),
    key=len,
    reverse=True,
)
_DIGITS = re.compile(r"\d+")


def _split_digits(run: str, previous: str) -> list[str]:
    if previous in ("input_blocks", "output_blocks") and len(run) >= 2:
        return [run[:-1], run[-1]]
    if previous == "label_emb":
        return list(run)
    return [run]


def unflatten(name: str) -> str | None:
    """``model_ema.diffusion_model…`` -> ``model.diffusion_model.…``; None for a name that does not
    read as an LDM UNet name."""
    rest = name.removeprefix(PREFIX)
    parts: list[str] = []
    while rest:
        digits = _DIGITS.match(rest)
        if digits:
            if not parts:
                return None
            parts += _split_digits(digits.group(), parts[-1])
            rest = rest[digits.end() :]
            continue
        word = next((w for w in _WORDS if rest.startswith(w)), None)
        if word is None:
            return None
        parts.append(word)
        rest = rest[len(word) :]
    if len(parts) < 2 or parts[0] != "diffusion_model" or parts[-1] not in ("weight", "bias"):
        return None
    return "model." + ".".join(parts)


def is_ema_only(names: set[str] | list[str]) -> bool:
    """A file whose UNet is stored only as its EMA (no ``model.diffusion_model.*`` names)."""
    names = list(names)
    return any(n.startswith(PREFIX + "diffusion_model") for n in names) and not any(n.startswith(UNET) for n in names)


def restore_names(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """(EMA name -> LDM name for each UNet tensor, the names that do not read as LDM UNet names)."""
    mapping: dict[str, str] = {}
    unreadable: list[str] = []
    for name in names:
        if name in BOOKKEEPING:
            continue
        restored = unflatten(name) if name.startswith(PREFIX) else None
        if restored is None:
            unreadable.append(name)
        else:
            mapping[name] = restored
    return mapping, unreadable


def ldm_file(checkpoint: Fetched, scratch: Path) -> Fetched:
    """The checkpoint itself, or for an EMA-only file a copy in ``scratch`` under the LDM names
    (the EMA weights become the UNet's); a name that does not read back is a UserError."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    (path,) = checkpoint.files.values()
    names = list(read_header(path)[0])
    if not is_ema_only(names):
        return checkpoint
    mapping, unreadable = restore_names(names)
    if unreadable:
        raise UserError.one(
            "checkpoint",
            f"this EMA-only file holds names that are not an LDM UNet's, e.g. {', '.join(sorted(unreadable)[:3])}",
            "pass a UNet checkpoint in LDM layout (EMA-only files name it model_ema.diffusion_model...)",
        )
    out = scratch / "ema" / "model.safetensors"
    out.parent.mkdir(parents=True)
    with safe_open(str(path), "pt") as f:
        save_file({mapping[n]: f.get_tensor(n) for n in mapping}, str(out))
    return Fetched(source=checkpoint.source, kind=checkpoint.kind, files={"model.safetensors": out})
