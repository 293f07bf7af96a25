"""Fast artifact loading: the weights' pages read while Python builds the models.

Measured on the full-size SD 1.5 artifact (bench/RESULTS.md): diffusers' ``from_pretrained`` of a
safetensors folder is almost all Python (module construction, per-parameter assignment: ~1 s for
the UNet here, whatever its dtype); the bytes themselves are mmapped lazily, so a load that ends
there has not read them, and the first request pays the page faults. Two things overlap the two:

- ``Warmer``: a background thread that, in parallel with the Python work, asks the kernel to read
  every weight file (``posix_fadvise(WILLNEED)``, largest first) and, on the CPU, faults in every
  page of each component's tensors as soon as that component exists (the page faults and copies
  run in torch ops and syscalls, outside the GIL). Leaving the context waits for it: a load that
  returns has every tensor resident (on the CPU; on a GPU the copy to the device reads them).
- ``preload_components``: the weight-holding components built one by one (largest first), each
  handed to the warmer before the next is built, then passed to the pipeline's own
  ``from_pretrained`` (diffusers skips loading what it is given: same classes, same calls, same
  weights, so the same pixels).

And one thing checks them meanwhile: ``Verifier``, a thread that hashes the artifact's files the
memo does not vouch for (runtime.integrity.unverified) while the models are built, so that a
damaged file fails the load (runtime.integrity.IntegrityError) instead of being served. Its cost
on a load: bench/verify_cost.py.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from runtime.artifact import FileEntry, Manifest
from runtime.integrity import hash_mismatch, integrity_error

log = logging.getLogger(__name__)

PAGE = 4096
WEIGHT_SUFFIX = ".safetensors"


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files, largest first (the order the models are built in)."""
    return sorted(folder.rglob(f"*{WEIGHT_SUFFIX}"), key=lambda p: -p.stat().st_size)


def prefetch(path: Path) -> None:
    """Ask the kernel to read the whole file into the page cache (returns at once where it is
    already there; a no-op where the platform has no posix_fadvise)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def fault_in(module: Any) -> None:
    """Read one element per page of every parameter and buffer: maps every page of an mmapped
    tensor into this process (what the first request would otherwise pay)."""
    import torch

    with torch.inference_mode():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type != "cpu" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            flat[:: max(1, PAGE // t.element_size())].sum()


class Warmer:
    """Context manager: a thread that prefetches ``files`` and faults in each module given to
    ``add``; on exit, waits for it and re-raises what it raised."""

    def __init__(self, files: list[Path], fault: bool) -> None:
        self.files = files
        self.fault = fault
        self.todo: queue.Queue[Any] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="uiw-weight-warmer", daemon=True)

    def __enter__(self) -> Warmer:
        self.thread.start()
        return self

    def add(self, module: Any) -> None:
        if self.fault:
            self.todo.put(module)

    def _run(self) -> None:
        try:
            for f in self.files:
                prefetch(f)
            while (module := self.todo.get()) is not None:
                fault_in(module)
        except BaseException as e:  # reported by __exit__ in the loading thread
            self.error = e
            while self.todo.get() is not None:  # drain, so that __exit__'s sentinel ends us
                pass

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.todo.put(None)
        self.thread.join()
        if self.error is not None and kind is None:
            raise self.error


def preload_components(folder: Path, dtype: Any, warmer: Warmer) -> dict[str, Any]:
    """The pipeline folder's weight-holding components (a subfolder with safetensors), loaded
    with their class's ``from_pretrained`` as diffusers would, largest first, each handed to the
    warmer as soon as it exists. Returns ``{name: component}`` for the pipeline's from_pretrained."""
    index = json.loads((folder / "model_index.json").read_text())
    sizes = {}
    for name, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers")):
            continue
        files = list((folder / name).glob(f"*{WEIGHT_SUFFIX}")) if (folder / name).is_dir() else []
        if files:
            sizes[name] = sum(f.stat().st_size for f in files)
    out = {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        library, class_name = index[name]
        cls = getattr(importlib.import_module(library), class_name)
        # The subfolder as a path string, as diffusers' own load_sub_model passes it (_name_or_path)
        out[name] = cls.from_pretrained(os.path.join(folder, name), dtype=dtype, local_files_only=True)
        warmer.add(out[name])
    return out


class Verifier:
    """Context manager: a thread that hashes ``entries`` (largest first: the order the models are
    built in) while the block runs; on exit, waits for it and raises IntegrityError naming every
    file that hashed to something else, also when the block itself failed (a damaged file may be
    why it did: the integrity error says so, with the block's error as its context)."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, entries: list[FileEntry]) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest
        self.entries = sorted(entries, key=lambda e: -e.size)
        self.problems: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="uiw-weight-verifier", daemon=True)

    def __enter__(self) -> Verifier:
        if self.entries:
            self.thread.start()
        return self

    def _run(self) -> None:
        try:
            # hashlib and file reads release the GIL: the hashing runs beside the Python work
            for entry in self.entries:
                if (problem := hash_mismatch(self.artifact_dir, entry)) is not None:
                    self.problems.append(problem)
        except BaseException as e:  # reported by __exit__ in the loading thread
            self.error = e

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.entries:
            self.thread.join()
        if self.problems:
            raise integrity_error(self.artifact_dir, self.manifest, self.problems) from exc
        if self.error is not None and kind is None:
            raise self.error
