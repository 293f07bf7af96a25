"""Weights that hold NaN or Inf are a compile error naming the tensors.

A LoRA whose training diverged (a learning rate too high, an fp16 overflow) or a damaged file
loads without complaint and then turns every image black or into noise; nothing downstream says
why. Each file is checked where the build reads it, tensor by tensor: a file is streamed from its
memory map one tensor at a time (memory stays bounded by the largest tensor), a state already in
memory is checked in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from compiler.errors import UserError

NAMED = 3  # tensors named in the message; the count covers the rest


def _nonfinite(tensor: Any) -> str | None:
    """ "NaN", "Inf" or "NaN and Inf" for a floating tensor that holds them, else None."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    try:
        # One vectorised pass that propagates NaN (and carries ±Inf to an end): about 7 GB/s on
        # one core, where isfinite().all() writes a bool per element and runs 25 times slower.
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # dtypes without CPU kernels (float8): upcast this one
        tensor = tensor.float()
        low, high = torch.aminmax(tensor)
    if bool(low.isfinite()) and bool(high.isfinite()):
        return None
    nan, inf = bool(torch.isnan(tensor).any()), bool(torch.isinf(tensor).any())
    return "NaN and Inf" if nan and inf else "NaN" if nan else "Inf"


def nonfinite(tensors: Iterable[tuple[str, Any]]) -> tuple[int, int, list[str]]:
    """(tensors seen, tensors with NaN/Inf, the first few as "name (NaN)")."""
    seen = bad = 0
    named: list[str] = []
    for name, tensor in tensors:
        seen += 1
        found = _nonfinite(tensor)
        if found is not None:
            bad += 1
            if len(named) < NAMED:
                named.append(f"{name} ({found})")
    return seen, bad, named


def streamed(path: Path) -> Iterator[tuple[str, Any]]:
    """Every tensor of a safetensors file, one at a time, in the file's key order."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            yield key, f.get_tensor(key)


def require_finite(tensors: Iterable[tuple[str, Any]], where: str, what: str) -> None:
    """UserError at ``where`` if any of ``what``'s tensors holds NaN or Inf."""
    seen, bad, named = nonfinite(tensors)
    if not bad:
        return
    more = f" and {bad - len(named)} more" if bad > len(named) else ""
    raise UserError.one(
        where,
        f"{bad} of the {seen} tensors of this {what} hold NaN or Inf values: {', '.join(named)}{more}; "
        "the model would draw black or noise images",
        "a training run that diverged (learning rate too high, fp16 overflow) saves such weights, and so does a "
        "damaged file: use another version of the file, or download it again",
    )


def require_finite_file(path: Path, where: str, what: str) -> None:
    require_finite(streamed(path), where, what)
