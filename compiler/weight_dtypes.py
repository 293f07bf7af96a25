"""What a single file's weights became in the build, said in the manifest.

Most FLUX files on CivitAI (and some SD 1.5 ones) store their weights in fp8. diffusers casts every
tensor to the build's precision as it loads (fp8 -> bf16 is exact: every fp8 number is a bf16
number), and a recipe with ``quantize: fp8`` then quantizes the denoiser again, with its own
scales. Either way the artifact holds other numbers than the file, so the manifest says what the
file held and what it became ("source fp8 e4m3fn -> bf16") instead of the cast being silent.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from compiler.headers import DTYPE_BITS, read_header
from compiler.plan import BuildPlan

# safetensors dtype -> the name a user knows it by (floating dtypes only: ints are not cast)
FLOAT_NAMES = {
    "F8_E4M3": "fp8 e4m3fn",
    "F8_E5M2": "fp8 e5m2",
    "F16": "fp16",
    "BF16": "bf16",
    "F32": "fp32",
    "F64": "fp64",
}


def describe(path: Path, plan: BuildPlan) -> str:
    """ "source fp8 e4m3fn (912 tensors) + fp32 (480) -> bf16" (the dtype holding most bytes first),
    and the quantization on top."""
    keys, _ = read_header(path)
    tensors: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for shape, dtype in keys.values():
        if dtype in FLOAT_NAMES:
            tensors[dtype] += 1
            size[dtype] += DTYPE_BITS[dtype] * math.prod(shape)
    order = sorted(tensors, key=lambda d: (-size[d], d))
    source = " + ".join(
        f"{FLOAT_NAMES[d]} ({tensors[d]} tensors)" if i == 0 else f"{FLOAT_NAMES[d]} ({tensors[d]})"
        for i, d in enumerate(order)
    )
    text = f"source {source or 'no floating tensors'} -> {plan.precision}"
    if plan.runtime.quantize != "none":
        text += f", then the denoiser quantized to {plan.runtime.quantize} (optimum-quanto, per-channel scales)"
    return text


def conversions(checkpoint: Path | None, plan: BuildPlan) -> dict[str, str]:
    """Input role -> what its weights became, for the manifest."""
    return {} if checkpoint is None else {"checkpoint": describe(checkpoint, plan)}
