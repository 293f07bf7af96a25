"""Textual-inversion embeddings added to a pipeline at build time through diffusers' own loader:
new tokens in the tokenizer(s), their vectors as new rows of the text encoder's input embeddings,
saved with the artifact (the runtime loads a plain pipeline; prompts that use the token work).

File formats read (safetensors; A1111 .pt files arrive converted when ``allow_pickle`` is set):
A1111 ``emb_params`` / ``string_to_param.*``, diffusers ``learned_embeds`` (one key: the token),
SDXL's dual ``clip_l`` + ``clip_g`` (one vector set per text encoder).
"""

from __future__ import annotations

import logging
from typing import Any

from compiler.errors import UserError
from compiler.finite import require_finite
from compiler.plan import PlannedFile
from compiler.sources import Fetched
from runtime.artifact import EmbeddingInfo

log = logging.getLogger(__name__)

_A1111 = ("emb_params", "string_to_param.*", "string_to_param")


def _vectors(state: dict[str, Any], where: str) -> tuple[Any, str | None]:
    """(vectors [n, dim], the file's own token if it names one)."""
    for key in _A1111:
        if key in state:
            return state[key], None
    if len(state) == 1:
        ((token, vec),) = state.items()
        return vec, token  # diffusers' learned_embeds: {token: vector}
    raise UserError.one(
        where,
        f"not a textual-inversion embedding (keys: {', '.join(sorted(state)[:5])})",
        "A1111 (emb_params), diffusers (one key: the token) and SDXL (clip_l + clip_g) files are read",
    )


def load_embeddings(pipe: Any, items: list[tuple[PlannedFile, Fetched]]) -> tuple[EmbeddingInfo, ...]:
    if not items:
        return ()
    from safetensors.torch import load_file

    out = []
    for i, (planned, fetched) in enumerate(items):
        where = f"embeddings.{i}"
        (path,) = fetched.files.values()
        state = load_file(path)
        require_finite(state.items(), where, "embedding")
        if {"clip_l", "clip_g"} <= set(state):  # SDXL: one set of vectors per text encoder
            own = None
            parts = [("text_encoder", "tokenizer", state["clip_l"]), ("text_encoder_2", "tokenizer_2", state["clip_g"])]
        else:
            vec, own = _vectors(state, where)
            parts = [("text_encoder", "tokenizer", vec)]
        token = planned.token or own or planned.stem
        for encoder, tokenizer, vec in parts:
            if getattr(pipe, encoder, None) is None:
                raise UserError.one(where, f"the base has no {encoder} for this embedding", "check the family")
            vec = vec.reshape(-1, vec.shape[-1])
            try:
                pipe.load_textual_inversion(
                    vec, token=token, text_encoder=getattr(pipe, encoder), tokenizer=getattr(pipe, tokenizer)
                )
            except ValueError as e:  # diffusers: a token already in the vocabulary, a width mismatch
                raise UserError.one(
                    where,
                    f"cannot add {token!r} to {encoder}: {str(e).splitlines()[0][:300]}",
                    "choose another `token:` (it must be new to the tokenizer), and an embedding made for "
                    "this family (its vectors' width must be the text encoder's)",
                ) from None
        count = parts[0][2].reshape(-1, parts[0][2].shape[-1]).shape[0]
        log.info("embedding %s: %d vector(s) in %s", token, count, ", ".join(p[0] for p in parts))
        out.append(EmbeddingInfo(token=token, vectors=count, text_encoders=tuple(p[0] for p in parts)))
    return tuple(out)
