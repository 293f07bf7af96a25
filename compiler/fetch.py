"""Lock entries -> verified local files, with download failures turned into actionable errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compiler.errors import UserError
from compiler.lockfile import LockEntry
from compiler.sources import Context, Fetched, fetch
from compiler.sources.download import DiskFull, HashMismatch
from compiler.store import Store


def fetch_entry(
    entry: LockEntry,
    where: str,
    ctx: Context,
    precision: str,
    configs_only: bool = False,
    allow_pickle: bool = False,
    convert: Callable[[Path, str, str, Store], Path] | None = None,
) -> Fetched:
    """``convert``: how an allowed pickle becomes safetensors (default: its tensors, compiler.pickles)."""
    try:
        fetched = fetch(entry, where, ctx, precision, configs_only)
    except HashMismatch as e:
        raise UserError.one(
            where,
            f"{e.what}: the downloaded bytes hash to {e.found}, the lock pins {e.expected}; nothing was kept",
            "the server sent other bytes than were locked: if the upload was replaced on purpose, relock "
            "with lock=update and review the change; otherwise retry (a proxy or mirror may be corrupting it)",
        ) from None
    except DiskFull as e:
        raise UserError.one(
            where, str(e), "free space under the store (UIW_HOME) or run `python -m compiler.store gc`"
        ) from None
    if entry.kind == "file":
        files = dict(fetched.files)
        for name, path in fetched.files.items():
            if allow_pickle and is_pickle(path):
                from compiler.pickles import convert as tensors_of  # torch: only when a pickle is really allowed

                files[name] = (convert or tensors_of)(path, name, where, ctx.store)
            require_safetensors(files[name], name, where)
        fetched = Fetched(source=fetched.source, kind=fetched.kind, files=files, root=fetched.root)
    return fetched


def is_pickle(path: Path) -> bool:
    """PyTorch's zip container ("PK") or a bare pickle (protocol 2+ opens with 0x80)."""
    with path.open("rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def require_safetensors(path: Path, name: str, where: str) -> None:
    """Refuse anything but safetensors before any loader sees it: a pickle (.ckpt, .pt, .bin) can
    run code when loaded. Reads the 8-byte header length and the header's first byte only."""
    with path.open("rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if len(head) < 9 or head[8:9] != b"{" or n + 8 > size:
        pickle = is_pickle(path)
        kind = "a pickle (PyTorch .ckpt/.pt/.bin)" if pickle else "not a safetensors file"
        raise UserError.one(
            where,
            f"{name} is {kind}; only safetensors files are loaded",
            "pickled checkpoints can run code when loaded: use the model's .safetensors file "
            "(most CivitAI and Hub models offer one), or set `allow_pickle: true` to convert its tensors "
            "with torch.load(weights_only=True), which refuses anything that is not plain data",
        )
