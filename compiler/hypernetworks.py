"""A1111 hypernetworks: the .pt file read as A1111 reads it (with ``torch.load(weights_only=True)``,
only where a recipe allows pickles), checked, and written as safetensors + a JSON config that the
runtime (``runtime.hypernetworks``) turns into attention processors.

The .pt is a dict: context width (int) -> [key module state, value module state], plus settings:
``layer_structure`` (default [1, 2, 1]), ``activation_func`` (default none), ``is_layer_norm``,
``activate_output`` (default true), ``use_dropout``, ``last_layer_dropout``, ``dropout_structure``.
Each module is A1111's ``HypernetworkModule``: for each step of the layer structure a Linear, then
the activation (not after the last Linear unless ``activate_output``), a LayerNorm when
``is_layer_norm``, a Dropout where the dropout structure says (inactive when generating, so not
stored). The file's ``linear.N`` indexes must be the ones that structure gives, as A1111 loads it
strictly; its oldest files' ``linear1``/``linear2`` names are renamed as A1111 does.

Converted once per file into a blob (``Store.pickle_marker``), so later builds read safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import UserError
from compiler.finite import require_finite
from compiler.pickles import load_weights_only
from compiler.store import Store
from runtime.artifact import HYPERNETWORK_ACTIVATIONS, HYPERNETWORK_DIR, HypernetworkInfo, sha256_file

log = logging.getLogger(__name__)

META_KEY = "uiw.hypernetwork"  # the converted blob's config, in its safetensors metadata
_MARKER = "hypernetwork-v1"  # bump when the converted form changes
_OLD_NAMES = {"linear1.": "linear.0.", "linear2.": "linear.1."}  # A1111's fix_old_state_dict
FORMAT_HINT = "A1111 hypernetworks are .pt files saved by its Train tab (layer_structure, activation_func, ...)"


@dataclass(frozen=True)
class Settings:
    """A1111's settings of one hypernetwork, with its defaults for the keys a file lacks."""

    layer_structure: tuple[float, ...]
    activation: str | None
    layer_norm: bool
    activate_output: bool
    dropout_structure: tuple[float, ...]

    def layers(self) -> list[tuple[str, int | None]]:
        """A1111's Sequential, in order: (kind, width multiplier of the layer's output or None)."""
        ls = self.layer_structure
        out: list[tuple[str, int | None]] = []
        for i in range(len(ls) - 1):
            out.append(("linear", i))
            if self.activation not in (None, "linear") and (i < len(ls) - 2 or self.activate_output):
                out.append((self.activation, None))
            if self.layer_norm:
                out.append(("layer_norm", i))
            if self.dropout_structure[i + 1] > 0:
                out.append(("dropout", None))
        return out


def settings(raw: dict[Any, Any], where: str) -> Settings:
    """The file's settings as A1111's Hypernetwork.load reads them; a variant it cannot build, or
    this runtime cannot run, is refused by name."""
    ls = raw.get("layer_structure") or [1, 2, 1]
    if (
        not isinstance(ls, list | tuple)
        or len(ls) < 2
        or not all(isinstance(x, int | float) and x > 0 for x in ls)
        or ls[0] != 1
        or ls[-1] != 1
    ):
        raise UserError.one(
            where, f"layer_structure {ls!r} is not one A1111 builds (it starts and ends with 1)", FORMAT_HINT
        )
    act = raw.get("activation_func")
    if act not in (None, "linear") and act not in HYPERNETWORK_ACTIVATIONS:
        raise UserError.one(
            where,
            f"activation_func {act!r} is not supported",
            f"supported: linear, {', '.join(HYPERNETWORK_ACTIVATIONS)} (A1111's parameterless activations)",
        )
    dropout = raw.get("dropout_structure")
    use_dropout = bool(dropout and any(dropout)) or bool(raw.get("use_dropout", False))
    if dropout is None:  # A1111's parse_dropout_structure
        inner = [0.3] * (len(ls) - 3) if use_dropout else [0] * max(len(ls) - 3, 0)
        last = 0.3 if use_dropout and raw.get("last_layer_dropout", False) else 0
        dropout = [0, *inner, last, 0] if len(ls) > 2 else [0] * len(ls)
    # A1111 reads dropout_structure[i + 1] for each of the len(ls) - 1 Linears (its own default for
    # [1, 1] is one longer)
    if not isinstance(dropout, list | tuple) or len(dropout) < len(ls) or not all(0 <= p < 1 for p in dropout):
        raise UserError.one(where, f"dropout_structure {dropout!r} does not fit layer_structure {ls!r}", FORMAT_HINT)
    return Settings(
        tuple(ls), act, bool(raw.get("is_layer_norm", False)), bool(raw.get("activate_output", True)), tuple(dropout)
    )


def _module(state: Any, dim: int, s: Settings, at: str) -> dict[str, Any]:
    """One HypernetworkModule's state, checked against the structure A1111 builds for ``dim``, with
    its layers renumbered without the dropouts: ``{index}.weight`` / ``{index}.bias``."""
    import torch

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError.one(at, "not a module's state (a dict of tensors)", FORMAT_HINT)
    for old, new in _OLD_NAMES.items():
        state = {new + k.removeprefix(old) if k.startswith(old) else k: v for k, v in state.items()}
    want: dict[str, tuple[int, ...]] = {}
    renumber: dict[int, int] = {}
    kept = 0
    for index, (kind, i) in enumerate(s.layers()):
        if kind == "dropout":
            continue
        renumber[index] = kept
        kept += 1
        if kind == "linear":
            assert i is not None
            n_in, n_out = int(dim * s.layer_structure[i]), int(dim * s.layer_structure[i + 1])
            want |= {f"linear.{index}.weight": (n_out, n_in), f"linear.{index}.bias": (n_out,)}
        elif kind == "layer_norm":
            assert i is not None
            n_out = int(dim * s.layer_structure[i + 1])
            want |= {f"linear.{index}.weight": (n_out,), f"linear.{index}.bias": (n_out,)}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if have != want:
        wrong = sorted(set(have) ^ set(want)) or sorted(k for k in want if have[k] != want[k])
        raise UserError.one(
            at,
            f"its layers do not match its settings (layer_structure {list(s.layer_structure)}, activation "
            f"{s.activation}, layer norm {s.layer_norm}): {', '.join(wrong[:4])} differ",
            "the file is damaged or made by another tool; A1111 would refuse it too",
        )
    out = {}
    for key, tensor in state.items():
        pos, tail = re.fullmatch(r"linear\.(\d+)\.(weight|bias)", key).groups()  # type: ignore[union-attr]
        out[f"{renumber[int(pos)]}.{tail}"] = tensor.to(torch.float32).contiguous()
    return out


def read_pickle(path: Path, name: str, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors ``{dim}.{k|v}.{index}.{weight|bias}``, config) from an A1111 .pt."""
    raw = load_weights_only(
        path,
        name,
        where,
        "a hypernetwork that is only weights and settings loads with weights_only; this one holds more",
        f"{name}: not a readable PyTorch file",
        FORMAT_HINT,
    )
    dims = sorted(k for k in raw if type(k) is int) if isinstance(raw, dict) else []
    if not dims:
        what = f"keys: {', '.join(map(str, list(raw)[:6]))}" if isinstance(raw, dict) else type(raw).__name__
        raise UserError.one(where, f"{name} is not an A1111 hypernetwork: no per-width modules ({what})", FORMAT_HINT)
    s = settings(raw, where)
    tensors: dict[str, Any] = {}
    for dim in dims:
        pair = raw[dim]
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise UserError.one(f"{where}: width {dim}", "not a [key module, value module] pair", FORMAT_HINT)
        for which, state in zip("kv", pair, strict=True):
            module = _module(state, dim, s, f"{where}: width {dim}, {which} module")
            tensors |= {f"{dim}.{which}.{k}": v for k, v in module.items()}
    require_finite(tensors.items(), where, "hypernetwork")
    config = {
        "dims": dims,
        "layers": [kind for kind, _ in s.layers() if kind != "dropout"],
        "a1111": {
            "layer_structure": list(s.layer_structure),
            "activation_func": s.activation,
            "is_layer_norm": s.layer_norm,
            "activate_output": s.activate_output,
            "dropout_structure": list(s.dropout_structure),
        },
    }
    return tensors, config


def convert(path: Path, name: str, where: str, store: Store) -> Path:
    """The safetensors blob of an A1111 .pt (its config in the metadata), converted once per file."""
    from safetensors.torch import save_file

    source_hex = sha256_file(path)
    marker = store.pickle_marker(f"{source_hex}.{_MARKER}")
    if marker.is_file() and store.blob_path(marker.read_text().strip()).is_file():
        return store.blob_path(marker.read_text().strip())
    tensors, config = read_pickle(path, name, where)
    tmp = store.partial_path(f"hypernetwork-{source_hex}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(config, sort_keys=True)})
    digest = sha256_file(tmp)
    dest = store.blob_path(digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")
    log.info("converted hypernetwork %s (widths %s, layers %s)", name, config["dims"], config["layers"])
    return dest


def read_converted(path: Path, where: str) -> dict[str, Any]:
    """The config of a converted hypernetwork; another safetensors file is refused by name."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise UserError.one(
            where,
            "a .safetensors file is not an A1111 hypernetwork (those are .pt pickles with their settings)",
            f"give the hypernetwork's .pt file with `allow_pickle: true`; {FORMAT_HINT}",
        )
    config: dict[str, Any] = json.loads(meta[META_KEY])
    return config


def context_widths(unet: Any) -> tuple[set[int], set[int]]:
    """(every attention layer's context width, the cross-attention ones'): what A1111 keys the
    modules by (self-attention's context is its own input)."""
    from diffusers.models.attention_processor import Attention

    every, cross = set(), set()
    for m in unet.modules():
        if isinstance(m, Attention):
            every.add(m.cross_attention_dim if m.is_cross_attention else m.query_dim)
            if m.is_cross_attention:
                cross.add(m.cross_attention_dim)
    return every, cross


def check_fit(dims: list[int], unet: Any, family: str, where: str) -> None:
    """A hypernetwork made for the base's text context: it must have modules for some of the
    base's widths, and none for another text encoder's context width without the base's own
    (an SD 1.x hypernetwork's 768 on SDXL's 2048). Widths the base lacks are otherwise ignored,
    as A1111 ignores them (files trained with 768 and 1024 both)."""
    from compiler.families import CONTEXT_FAMILY

    every, cross = context_widths(unet)
    foreign = sorted(d for d in dims if d in CONTEXT_FAMILY and d not in every)
    if not set(dims) & every or (foreign and not set(dims) & cross):
        made_for = ", ".join(f"{CONTEXT_FAMILY[d]} ({d})" for d in foreign) or "none of them"
        raise UserError.one(
            where,
            f"this hypernetwork does not fit the {family} base: it has modules for context widths "
            f"{', '.join(map(str, dims))}; the base's attention layers take {', '.join(map(str, sorted(every)))} "
            f"(text context {', '.join(map(str, sorted(cross)))}). Made for: {made_for}",
            f"use a hypernetwork made for {family}, or a base of the hypernetwork's family",
        )
    if unused := sorted(set(dims) - every):
        log.warning("%s: modules for widths %s have no layer in this base (unused, as in A1111)", where, unused)


def build_hypernetworks(
    pipe: Any, items: list[tuple[Any, Any]], family: str, out: Path
) -> tuple[HypernetworkInfo, ...]:
    """Each planned hypernetwork checked against the base's attention layers and written under
    ``out/hypernetworks/``: ``NAME.safetensors`` (float32 tensors) and ``NAME.json`` (its config)."""
    infos = []
    for i, (planned, fetched) in enumerate(items):
        where = f"hypernetworks.{i}"
        (path,) = fetched.files.values()
        config = read_converted(path, where)
        check_fit(config["dims"], pipe.unet, family, where)
        folder = out / HYPERNETWORK_DIR
        folder.mkdir(parents=True, exist_ok=True)
        weights, settings_file = folder / f"{planned.name}.safetensors", folder / f"{planned.name}.json"
        shutil.copyfile(path, weights)
        settings_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        infos.append(
            HypernetworkInfo(
                name=planned.name,
                strength=planned.scale,
                weights=f"{HYPERNETWORK_DIR}/{weights.name}",
                config=f"{HYPERNETWORK_DIR}/{settings_file.name}",
            )
        )
    return tuple(infos)
