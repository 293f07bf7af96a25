"""The converted-base cache: a single-file checkpoint converted to diffusers' layout once, kept in
the store by what decides its bytes, so that a rebuild whose other inputs changed (a LoRA's scale,
an embedding, the scheduler) loads it with ``from_pretrained`` instead of converting the file again.

This module decides the entry's key (``converted_key``) and runs the conversion or the load
(``ConvertedBase``); ``compiler.store.converted_bases`` keeps the entries on disk
(``<store>/converted/v1/<key>/``). Torch-free: the compiler's cache-hit path imports it; the
caller passes the conversion, load and save steps in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.plan import BuildPlan
from compiler.store.converted_bases import ConvertedBaseStore
from runtime.artifact import PIPELINE_DIR

log = logging.getLogger(__name__)

# Bump by hand when the compiler converts the same inputs into other bytes (another converter
# call, another post-conversion fix-up). Independent of COMPILER_REVISION: a change to what is
# built on top of the base does not invalidate the conversions.
CONVERTED_REVISION = "1"
# The libraries whose code writes the converted bytes (the converter, the model classes and their
# save format); peft and the compiler's own revision only touch what is built on top.
CONVERTER_LIBRARIES = ("torch", "diffusers", "transformers", "safetensors")
# What a damaged entry raises when loaded (a truncated or garbled safetensors file, a bad config).
# (safetensors' own SafetensorError is added where it is imported.)
LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, RuntimeError, KeyError)


def converted_key(plan: BuildPlan, environment: dict[str, str]) -> str | None:
    """sha256 of what decides a whole-pipeline single-file conversion, or None when the plan has
    none (a diffusers base, or a UNet-only file that joins one: its conversion is one component).

    In it: the checkpoint's bytes, the config repo's bytes (the configs and tokenizer it is
    converted with), the pipeline class and family (which converter runs), the detected kind and
    the build precision (converted straight to it), and the converter's library versions. Not in
    it: the prediction type, the scheduler, adapters and the recipe's name, all applied after the
    conversion, so recipes that differ only there share one entry."""
    if plan.checkpoint is None or plan.checkpoint_kind != "checkpoint":
        return None
    payload = {
        "revision": CONVERTED_REVISION,
        "checkpoint": plan.checkpoint,
        "checkpoint_inputs": sorted(list(i) for i in plan.checkpoint_inputs),
        "kind": plan.checkpoint_kind,
        "configs": plan.base,
        "configs_inputs": sorted(list(i) for i in plan.base_inputs),
        "family": plan.family,
        "pipeline_class": plan.pipeline_class,
        "precision": plan.precision,
        "libraries": {lib: environment.get(lib) for lib in CONVERTER_LIBRARIES},
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ConvertedBase:
    """One plan's converted base: where it is (or goes) in the store, and what it came from."""

    store: ConvertedBaseStore
    key: str
    about: dict[str, str]  # recorded in entry.json: the checkpoint, configs, family, precision

    @property
    def folder(self) -> Path:
        return self.store.path(self.key) / PIPELINE_DIR

    def load_or_convert(
        self,
        convert: Callable[[], Any],
        load: Callable[[Path], Any],
        save: Callable[[Any, Path], None],
    ) -> Any:
        """The converted pipeline: loaded from the entry (``load``) on a hit; on a miss converted
        (``convert``), saved into a new entry (``save``) and loaded back from it, so that a build
        continues from the same bytes whichever way it went (cold and warm builds give one
        artifact). A damaged entry is discarded and converted again."""
        from safetensors import SafetensorError

        errors: tuple[type[Exception], ...] = (*LOAD_ERRORS, SafetensorError)
        t0 = time.perf_counter()
        if self.store.lookup(self.key) is not None:
            try:
                pipe = load(self.folder)
            except errors as e:
                log.warning("converted base %s does not load (%s); converting again", self.key, str(e)[:200])
                with self.store.lock(self.key):
                    self.store.discard(self.key)
            else:
                log.info("converted base: hit %s (loaded in %.2f s)", self.key, time.perf_counter() - t0)
                return pipe
        with self.store.filling(self.key) as staging:
            if staging is not None:
                log.info("converted base: miss %s; converting the single file", self.key)
                pipe = convert()
                save(pipe, staging / PIPELINE_DIR)
                del pipe
                self.store.publish(staging, self.key, self.about)
                log.info("converted base: stored %s (%.1f s)", self.key, time.perf_counter() - t0)
            else:
                log.info("converted base: hit %s (filled by another compile meanwhile)", self.key)
        return load(self.folder)
