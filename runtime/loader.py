"""Artifact directory -> pipeline on a device, offline, weights already in their final dtype."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.artifact import PIPELINE_DIR, Manifest, read_manifest

# Artifacts are complete: nothing at serve time may reach the Hub. Set before diffusers or
# huggingface_hub are imported (the loader imports them lazily, after this line).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Loaded:
    path: Path
    manifest: Manifest
    pipeline: Any
    device: str
    load_seconds: float


def transformers_logging() -> Any:
    from transformers.utils import logging as tlog

    return tlog


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(artifact_dir: Path, device: str | None = None) -> Loaded:
    t0 = time.perf_counter()
    manifest = read_manifest(artifact_dir)
    import diffusers
    import torch

    diffusers.utils.logging.disable_progress_bar()
    transformers_logging().disable_progress_bar()
    device = device or default_device()
    cls = getattr(diffusers, manifest.pipeline_class)
    # An explicit dtype: without one diffusers upcasts half-precision files to fp32 on load.
    pipe = cls.from_pretrained(
        Path(artifact_dir) / PIPELINE_DIR,
        dtype=getattr(torch, DTYPES[manifest.runtime.dtype]),
        local_files_only=True,
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    seconds = time.perf_counter() - t0
    log.info(
        "loaded %s (%s, %s) on %s in %.2f s",
        manifest.recipe,
        manifest.cache_key[:12],
        manifest.runtime.dtype,
        device,
        seconds,
    )
    return Loaded(Path(artifact_dir), manifest, pipe, device, seconds)
