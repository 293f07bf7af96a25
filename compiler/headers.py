"""A safetensors file's header, read and checked as safetensors checks it before loading: the
8-byte length and the JSON header, nothing more (no tensor is read, nothing executes); and the
probes detection looks up in it (a key by pattern, one of its dimensions)."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

Shape = tuple[int, ...]

MAX_HEADER = 100 << 20  # a header larger than this is not a model file's


class HeaderError(ValueError):
    """The file cannot be read as a safetensors model file; the message says what is wrong."""


# Bits per element of every safetensors dtype (its format's own table): a header's byte ranges
# must hold exactly shape x this, as safetensors itself checks when a loader opens the file.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
}


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file. A FIFO or a device would block the
    read (or never end): opened non-blocking, checked with fstat, refused before any read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise HeaderError(f"{path} is {kind}: only regular files are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_header(path: Path) -> tuple[dict[str, tuple[Shape, str]], dict[str, str]]:
    """(key -> (shape, dtype), metadata) from a safetensors file's header, checked as safetensors
    checks it before loading: every tensor's byte range inside the file and of its shape's size
    (a truncated download fails here, by name, rather than in a loader's traceback)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n + 8 > size:
            raise HeaderError("not a safetensors file (header length out of range; a pickle or another format?)")
        try:
            raw = json.loads(f.read(n))
        except ValueError as e:
            raise HeaderError(f"not a safetensors header ({e})") from None
    if not isinstance(raw, dict):
        raise HeaderError("not a safetensors header (not a JSON object)")
    meta = raw.pop("__metadata__", None) or {}
    keys = {k: _entry(k, v) for k, v in raw.items()}
    _check_offsets(raw, keys, size - 8 - n)
    return {k: (shape, dtype) for k, (shape, dtype, _) in keys.items()}, {str(k): str(v) for k, v in dict(meta).items()}


def _entry(key: str, v: Any) -> tuple[Shape, str, tuple[int, int]]:
    """One header entry, checked for the fields and types safetensors requires."""
    if isinstance(v, dict):
        dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
        if (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
        ):
            if dtype not in DTYPE_BITS:
                raise HeaderError(f"tensor {key}: unknown dtype {dtype!r}")
            return tuple(shape), dtype, (offsets[0], offsets[1])
    raise HeaderError(f"tensor {key}: not a safetensors entry (dtype, shape, data_offsets): {str(v)[:120]}")


def _check_offsets(raw: dict[str, Any], keys: dict[str, tuple[Shape, str, tuple[int, int]]], data: int) -> None:
    """Byte ranges back to back from 0 to the end of the file, each of its tensor's size."""
    at = 0
    for k, (shape, dtype, (begin, end)) in sorted(keys.items(), key=lambda kv: kv[1][2]):
        if end > data:
            raise HeaderError(
                f"tensor {k} ends at byte {end} of the data, past the end of the file ({data} data bytes): "
                "the file is truncated (an interrupted download or copy?)"
            )
        if begin != at or end < begin:
            raise HeaderError(
                f"tensor {k}: its bytes [{begin}, {end}) overlap or leave a gap (expected to start at {at})"
            )
        bits = DTYPE_BITS[dtype] * math.prod(shape)
        if bits != (end - begin) * 8:
            raise HeaderError(
                f"tensor {k}: {dtype} {list(shape)} takes {bits // 8} bytes, its range holds {end - begin}"
            )
        at = end
    if at != data:
        raise HeaderError(
            f"the tensors end at byte {at} of the data but the file holds {data}: not a whole safetensors file"
        )


def find_key(keys: dict[str, tuple[Shape, str]], pattern: str) -> tuple[str, Shape] | None:
    rx = re.compile(pattern)
    for k in sorted(keys):
        if rx.search(k):
            return k, keys[k][0]
    return None


def key_evidence(hit: tuple[str, Shape]) -> str:
    return f"{hit[0]} {list(hit[1])}"


class MalformedTensor(Exception):
    """A tensor that decides detection has fewer dimensions than its layer's weight has."""

    def __init__(self, key: str, shape: Shape, axis: int):
        super().__init__(key)
        self.key, self.shape, self.axis = key, shape, axis


def probe_dim(hit: tuple[str, Shape], axis: int) -> int:
    """One dimension of a probed tensor; a shape too short for it is a damaged or hand-made file
    (say a 1-D "convolution" weight), which detection reports rather than indexing past it."""
    key, shape = hit
    if (axis if axis >= 0 else -axis - 1) >= len(shape):
        raise MalformedTensor(key, shape, axis)
    return shape[axis]
