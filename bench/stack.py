"""The SD 1.5-architecture stack the bench compares on: one single-file checkpoint (LDM layout),
two kohya LoRAs and one A1111 embedding, seeded random weights, written to a folder with the
recipe that compiles them and the family's config repo (served from the loopback Hub at compile).

Two sizes, one code path:
- ``full``: the real SD 1.5 layout and shapes (tests/fixtures/model-keys/sd1-ldm.yaml, 2.1 GB
  fp16 checkpoint), the real family configs (compiler.family_configs), LoRAs of rank 16 and 32
  on every module a kohya SD 1.5 LoRA trains (UNet transformer blocks' projections, text encoder
  attention and MLP), a 768-wide embedding.
- ``tiny``: builtin:tiny-sd15 turned into an LDM file, the same LoRA/embedding recipe at its width:
  what the fast test runs.

LoRA module names come from the models themselves (built on the meta device from the configs), so
every name lands on a real module of that size.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STACK_FILE = "stack.json"
SIZES = ("tiny", "full")
LORA_RANKS = (16, 32)
LORA_SCALES = (0.8, 0.6)
TOKEN = "benchstyle"
PROMPT = f"a lighthouse at dusk, {TOKEN}"


@dataclass(frozen=True)
class LoraFile:
    path: str
    scale: float
    rank: int


@dataclass(frozen=True)
class Stack:
    """What the naive baseline loads and the recipe names: absolute paths."""

    size: str
    folder: str
    checkpoint: str
    configs: str  # the family's config repo as a local folder (from_single_file's `config=`)
    loras: tuple[LoraFile, ...]
    embedding: str
    token: str
    recipes_dir: str
    recipe: str

    @property
    def weight_files(self) -> list[Path]:
        return [Path(self.checkpoint), *(Path(lo.path) for lo in self.loras), Path(self.embedding)]

    @classmethod
    def read(cls, folder: Path) -> Stack:
        data = json.loads((folder / STACK_FILE).read_text())
        data["loras"] = tuple(LoraFile(**lo) for lo in data["loras"])
        return cls(**data)


def config_files(size: str) -> dict[str, bytes]:
    """The sd15 config repo's files (no weights) at this size."""
    if size == "full":
        from tests.helpers.configrepos import config_repo_files

        return config_repo_files("sd15")
    import tempfile

    from compiler.tiny_models import BUILTINS
    from tests.helpers.fakehub import tree

    with tempfile.TemporaryDirectory() as tmp:
        BUILTINS["tiny-sd15"].build().save_pretrained(tmp)
        return {p: b for p, b in tree(Path(tmp)).items() if not p.endswith(".safetensors")}


def lora_targets(configs: Path) -> dict[str, tuple[int, int, bool]]:
    """kohya module name -> (in features, out features, is a 1x1 conv) for every module a kohya
    SD 1.5 LoRA trains, read off the models built (weightless) from the configs."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    out: dict[str, tuple[int, int, bool]] = {}
    for name, mod in unet.named_modules():
        if ".attentions." not in name or not ("transformer_blocks" in name or name.endswith(("proj_in", "proj_out"))):
            continue
        if isinstance(mod, torch.nn.Linear):
            out["lora_unet_" + name.replace(".", "_")] = (mod.in_features, mod.out_features, False)
        elif isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1):
            out["lora_unet_" + name.replace(".", "_")] = (mod.in_channels, mod.out_channels, True)
    for name, mod in te.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            full = name if name.startswith("text_model.") else f"text_model.{name}"
            out["lora_te_" + full.replace(".", "_")] = (mod.in_features, mod.out_features, False)
    return out


def write_lora(path: Path, targets: dict[str, tuple[int, int, bool]], rank: int, seed: int) -> None:
    """A kohya file: lora_down/lora_up in fp16 and alpha = rank / 2 per module."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for name, (fin, fout, conv) in sorted(targets.items()):
        down = torch.randn(rank, fin, generator=g) / fin**0.5
        up = torch.randn(fout, rank, generator=g) * 0.01
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        state[f"{name}.lora_down.weight"] = down.half().contiguous()
        state[f"{name}.lora_up.weight"] = up.half().contiguous()
        state[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    save_file(state, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})


def write_checkpoint(size: str, path: Path) -> None:
    if size == "full":
        from bench.single_file_sd15 import write_checkpoint as full

        full(path)
        return
    from safetensors.torch import save_file

    from compiler.tiny_models import BUILTINS
    from tests.helpers.ldm import pipeline_to_ldm

    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(BUILTINS["tiny-sd15"].build()).items()}, path)


def recipe_text(stack_loras: tuple[LoraFile, ...], checkpoint: str, embedding: str) -> str:
    loras = "".join(f"  - source: ./{Path(lo.path).name}\n    scale: {lo.scale}\n" for lo in stack_loras)
    return (
        f"checkpoint: ./{Path(checkpoint).name}\n"
        "precision: fp32\n"
        "scheduler: K_EULER\n"
        f"loras:\n{loras}"
        f"embeddings:\n  - source: ./{Path(embedding).name}\n    token: {TOKEN}\n"
    )


def build(folder: Path, size: str) -> Stack:
    """Write the stack into ``folder`` (once: an existing complete stack is reused)."""
    if size not in SIZES:
        raise ValueError(f"bench stack size {size!r}: expected one of {SIZES}. hint: stack.size=tiny or full")
    if (folder / STACK_FILE).is_file():
        stack = Stack.read(folder)
        if stack.size == size:
            return stack
    import torch
    from safetensors.torch import save_file

    recipes = folder / "recipes"
    configs = folder / "configs"
    recipes.mkdir(parents=True, exist_ok=True)
    for rel, data in config_files(size).items():
        (configs / rel).parent.mkdir(parents=True, exist_ok=True)
        (configs / rel).write_bytes(data)
    ckpt = recipes / f"sd15-{size}.safetensors"
    write_checkpoint(size, ckpt)
    targets = lora_targets(configs)
    loras = []
    for i, (rank, scale) in enumerate(zip(LORA_RANKS, LORA_SCALES, strict=True)):
        path = recipes / f"lora-r{rank}.safetensors"
        write_lora(path, targets, rank, seed=100 + i)
        loras.append(LoraFile(str(path), scale, rank))
    width = json.loads((configs / "text_encoder" / "config.json").read_text())["hidden_size"]
    embedding = recipes / f"{TOKEN}.safetensors"
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(7)) * 0.01}, embedding)
    name = f"bench-sd15-{size}"
    (recipes / f"{name}.yaml").write_text(recipe_text(tuple(loras), str(ckpt), str(embedding)))
    stack = Stack(size, str(folder), str(ckpt), str(configs), tuple(loras), str(embedding), TOKEN, str(recipes), name)
    for path in stack.weight_files:  # written: flush, so that a later eviction can drop the pages
        with path.open("rb") as f:
            os.fsync(f.fileno())
    (folder / STACK_FILE).write_text(json.dumps(asdict(stack), indent=1))
    return stack
