"""Pure cross-checks between what a recipe asks for, its base's family and what its files are. No I/O."""

from __future__ import annotations

from compiler.detect import INVALID_HINT, Detection
from compiler.errors import Problem, UserError
from compiler.families import CONTEXT_FAMILY, Family, family_of_civitai_base_model, lineage
from compiler.generic import is_generic
from compiler.recipe import Recipe
from compiler.tasks import task_problems
from runtime.artifact import Defaults, Limits, RuntimeOptions


def check_readable(found: Detection, where: str) -> None:
    """A file detection could not read as a safetensors model file (truncated, malformed, not a
    regular file) is an error here, before anything loads it."""
    if found.kind == "invalid":
        raise UserError.one(
            where,
            f"not a readable safetensors model file: {'; '.join(found.evidence)}",
            INVALID_HINT,
        )


def check_checkpoint(
    found: Detection, base_family: str, where: str, civitai_base_model: str | None = None, override: bool = False
) -> None:
    """A checkpoint must be a whole pipeline (or a UNet or transformer) of the base's family, and agree with what
    CivitAI says it is. Raises UserError naming both families and the evidence; never guesses.
    ``override``: the recipe's ``family:`` chose ``base_family``, which settles an ambiguous file
    (one of its candidates) but never contradicts a file whose header is clear."""
    check_readable(found, where)
    evidence = "; ".join(found.evidence) or "none"
    if found.kind not in ("checkpoint", "unet", "transformer"):
        raise UserError.one(
            where,
            f"this file is a {found.kind}, not a checkpoint (evidence: {evidence})",
            "a LoRA, embedding, VAE or ControlNet goes in its own recipe field; `checkpoint:` takes a whole model",
        )
    if found.family is None and override and base_family in found.candidates:
        return
    if found.family is None:
        raise UserError.one(
            where,
            f"cannot tell this checkpoint's family; candidates: {', '.join(found.candidates) or 'none'} "
            f"(evidence: {evidence})",
            "set `family:` in the recipe to one of the candidates if you know which it is",
        )
    if found.family != base_family and override:
        raise UserError.one(
            where,
            f"`family: {base_family}` contradicts the file, which is {found.family} (evidence: {evidence})",
            "remove `family:` (it is only for files whose family detection cannot tell)",
        )
    if found.family != base_family:
        raise UserError.one(
            where,
            f"this checkpoint is {found.family} but the base is {base_family} (evidence: {evidence})",
            f"use a {found.family} base (its configs and tokenizer), or a {base_family} checkpoint",
        )
    claimed = family_of_civitai_base_model(civitai_base_model)
    if civitai_base_model and claimed is not None and claimed != found.family:
        raise UserError.one(
            where,
            f"CivitAI lists this file as {civitai_base_model!r} ({claimed}), but its weights are {found.family} "
            f"(evidence: {evidence})",
            "the upload is mislabelled or the version id is wrong; check the model page",
        )


def check_adapter(found: Detection, kind: str, family: str, where: str) -> None:
    """An adapter must be of its field's kind and, where its header tells, of the base's family.
    A family the header cannot tell (tiny widths, a LoRA of text-encoder modules only) is left to
    the build, which checks every module the file names against the base's actual modules."""
    check_readable(found, where)
    evidence = "; ".join(found.evidence) or "none"
    if found.kind != kind:
        raise UserError.one(
            where,
            f"this file is {_a(found.kind)}, not {_a(kind)} (evidence: {evidence})",
            f"this field takes {FIELD_TAKES[kind]}; `python -m compiler.detect FILE` says what a file is",
        )
    # Header families are the registry's: a generic base is none of them, so there the build's
    # every-module-lands check decides (a FLUX-like block name says nothing of a Chroma base).
    if found.family is not None and not is_generic(family) and lineage(found.family) != lineage(family):
        raise UserError.one(
            where,
            f"this {kind} is made for {found.family}, the base is {family} (evidence: {evidence})",
            f"use a {family} {kind}, or a {found.family} base",
        )


# How LoRA files name a base's modules, per component: kohya's prefix before the module path with
# "_" for "." (SD 1.x/2.x UNets in diffusers naming, CLIP text encoders), and PEFT/diffusers names.
_KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
# LoRA "down" and "up" factor key endings, as pairs: (down, up).
_FACTORS = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)


def _layer_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every name a LoRA file may give a base layer -> (the layer's "component.module", its
    weight shape). Text encoders are named with or without transformers' ``text_model.`` level
    (transformers 5 dropped it; files keep it)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) not in (2, 4):  # Linear and Conv2d layers
            continue
        comp, module = key.removesuffix(".weight").split(".", 1)
        modules = {module}
        if comp.startswith("text_encoder"):
            modules |= {module.removeprefix("text_model."), "text_model." + module.removeprefix("text_model.")}
        for m in modules:
            for name in (f"{comp}.{m}", *(p + m.replace(".", "_") for p in _KOHYA_PREFIXES.get(comp, ()))):
                out[name] = (f"{comp}.{module}", shape)
            if comp == "unet":
                out[m] = (f"{comp}.{module}", shape)  # PEFT files of the denoiser alone, unprefixed
    return out


def check_lora_shapes(
    lora: dict[str, tuple[int, ...]],
    base: dict[str, tuple[int, ...]],
    family: str,
    found: Detection,
    where: str,
) -> None:
    """Each LoRA module the base has by name must fit its layer: the down factor's input width is
    the layer's, the up factor's output width too. Pure: shapes from the file's header and the
    base's layers (``component.module.weight`` -> shape). Modules named in ways this does not map
    (SGM-named SDXL kohya files, LyCORIS) are left to the build, which checks where each lands."""
    names = _layer_names(base)
    bad: list[tuple[str, str, tuple[int, int], tuple[int, int]]] = []  # layer, file module, widths
    checked = 0
    for key in sorted(lora):
        for down_end, up_end in _FACTORS:
            if not key.endswith(down_end):
                continue
            module = key.removesuffix(down_end)
            up = lora.get(module + up_end)
            hit = names.get(module)
            if hit is None or up is None or len(lora[key]) < 2 or len(up) < 1:
                continue
            checked += 1
            layer, shape = hit
            have, want = (lora[key][1], up[0]), (shape[1], shape[0])
            if have != want:
                bad.append((layer, module, have, want))
    if not bad:
        return
    shown = "; ".join(
        f"{layer} ({module}): {h[0]} -> {h[1]} in the file, {w[0]} -> {w[1]} in the base"
        for layer, module, h, w in bad[:2]
    )
    lora_family = found.family or _context_family(bad) or "not told by its header"
    raise UserError.one(
        where,
        f"this LoRA does not fit the {family} base: {len(bad)} of the {checked} layers it patches "
        f"{'has' if len(bad) == 1 else 'have'} other widths "
        f"(inputs -> outputs), e.g. {shown}. The LoRA's family: {lora_family}",
        f"use a LoRA made for {family} (its model page names the base model it was trained on), "
        "or a base of the LoRA's family",
    )


def _context_family(bad: list[tuple[str, str, tuple[int, int], tuple[int, int]]]) -> str | None:
    """A cross-attention key/value layer's input width is the text context's (SD 1.x 768, SD 2.x
    1024, SDXL 2048), which names the LoRA's family where its header's detection could not."""
    for layer, _, (width, _), _ in bad:
        fam = CONTEXT_FAMILY.get(width) if layer.endswith(("attn2.to_k", "attn2.to_v")) else None
        if fam is not None:
            return f"{fam} (its cross-attention takes a {width}-wide text context)"
    return None


FIELD_TAKES = {
    "lora": "LoRA files (kohya, PEFT/diffusers, LyCORIS)",
    "vae": "one VAE file (LDM or diffusers naming)",
    "embedding": "textual-inversion files (A1111, diffusers learned_embeds, SDXL clip_l + clip_g)",
    "controlnet": "ControlNet files (LDM control_model.* or diffusers naming)",
}


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def check_plan(
    recipe: Recipe,
    family: Family,
    detected: Detection | None,
    defaults: Defaults,
    limits: Limits,
    scheduler: str,
    base_variant: str = "normal",
) -> list[Problem]:
    """The recipe against its base's family, once the family's defaults are filled in: defaults
    within limits, a scheduler of the family, a text-to-image model, ControlNets and prediction
    where the family has them, and the performance options. Returns every problem found."""
    where = str(recipe.path)
    out = [
        Problem(
            f"{where}: defaults.{field}",
            f"{value} exceeds limits.{limit} = {bound}",
            f"lower defaults.{field} or raise limits.{limit}",
        )
        for field, value, limit, bound in (
            ("width", defaults.width, "max_width", limits.max_width),
            ("height", defaults.height, "max_height", limits.max_height),
            ("steps", defaults.steps, "max_steps", limits.max_steps),
        )
        if value > bound
    ]
    if scheduler not in family.schedulers:
        out.append(
            Problem(
                f"{where}: scheduler",
                f"{scheduler} does not fit {family.label} ({family.prediction} prediction)",
                f"one of {', '.join(family.schedulers)}",
            )
        )
    out.extend(task_problems(where, family, detected, base_variant, bool(recipe.controlnets)))
    if recipe.controlnets and "controlnet" not in family.pipelines:
        out.append(
            Problem(f"{where}: controlnets", f"{family.label} has no ControlNet pipeline here", "remove `controlnets:`")
        )
    out.extend(_hypernetwork_problems(recipe, family))
    if recipe.prediction is not None and family.prediction == "flow":
        out.append(Problem(f"{where}: prediction", f"{family.label} is a flow-matching model", "remove `prediction:`"))
    out.extend(check_performance(recipe, (limits.max_width, limits.max_height)))
    return out


# A1111 hypernetworks change the attention of LDM UNets: the SD 1.x, 2.x and XL families'.
HYPERNETWORK_FAMILIES = ("sd15", "sd2", "sdxl", "sdxl-refiner")


def _hypernetwork_problems(recipe: Recipe, family: Family) -> list[Problem]:
    where = str(recipe.path)
    if not recipe.hypernetworks:
        return []
    out = []
    if family.id not in HYPERNETWORK_FAMILIES:
        out.append(
            Problem(
                f"{where}: hypernetworks",
                f"A1111 hypernetworks change a UNet's attention layers; {family.label} has no UNet",
                "hypernetworks exist for Stable Diffusion 1.x, 2.x and XL bases; use a LoRA for this family",
            )
        )
    if recipe.runtime.fused_qkv:
        out.append(
            Problem(
                f"{where}: fused_qkv",
                "fused_qkv computes keys and values in one matmul from one input; a hypernetwork gives the key "
                "and the value inputs of their own",
                "drop `fused_qkv:` (or the hypernetworks)",
            )
        )
    return out


def check_performance(recipe: Recipe, limits: tuple[int, int]) -> list[Problem]:
    """dtype x offload x compile x quantize x fused QKV x switchable LoRAs: the combinations that
    cannot work, each with the reason and a fix. ``limits``: the artifact's (max_width,
    max_height). Returns every problem found (the plan reports them with its own)."""
    where = str(recipe.path)
    options = recipe.runtime
    switchable = [lora.name for lora in recipe.loras if not lora.fuse]
    out: list[Problem] = []
    if options.compile.scope != "off" and options.offload in _MOVING:
        out.append(
            Problem(
                f"{where}: compile",
                f"compile {options.compile.scope} with offload {options.offload}: the offload hooks move weights "
                "inside every forward, which torch.compile turns into graph breaks and recompiles",
                "use `offload: model` (whole components move, the compiled denoiser stays intact) or `offload: none`",
            )
        )
    if options.quantize != "none":
        out.extend(_quantize_problems(where, options, switchable))
    if options.fused_qkv and switchable:
        out.append(
            Problem(
                f"{where}: fused_qkv",
                f"switchable LoRAs ({', '.join(switchable)}) target to_q/to_k/to_v, which fused_qkv replaces with "
                "one to_qkv layer: they would silently stop applying",
                "fuse the LoRAs (`fuse: true`) or drop `fused_qkv:`",
            )
        )
    for i, (w, h) in enumerate(options.compile.shapes if options.compile.scope != "off" else ()):
        if w > limits[0] or h > limits[1]:
            out.append(
                Problem(
                    f"{where}: compile.shapes.{i}",
                    f"[{w}, {h}] exceeds the artifact's limits ({limits[0]}x{limits[1]})",
                    "warm sizes that requests may ask for, or raise limits.max_width/max_height",
                )
            )
    return out


_MOVING = ("sequential", "group")  # offload kinds that move weights inside every forward


def _quantize_problems(where: str, options: RuntimeOptions, switchable: list[str]) -> list[Problem]:
    """What a quantized denoiser cannot be combined with."""
    out = []
    if options.offload in _MOVING:
        out.append(
            Problem(
                f"{where}: quantize",
                f"quantize {options.quantize} with offload {options.offload}: optimum-quanto's weights cannot be "
                "offloaded leaf by leaf (diffusers refuses quanto with a CPU/disk device map)",
                "use `offload: model` or `offload: none` with a quantized denoiser",
            )
        )
    if options.fused_qkv:
        out.append(
            Problem(
                f"{where}: fused_qkv",
                "fused_qkv with quantize: the fuse concatenates float weights, the quantized layers hold int8/fp8 "
                "ones with per-layer scales",
                "choose one: `quantize:` (smaller weights) or `fused_qkv: true` (fewer, larger matmuls)",
            )
        )
    if switchable:
        out.append(
            Problem(
                f"{where}: quantize",
                f"switchable LoRAs ({', '.join(switchable)}) need float layers; quantized ones have none",
                "fuse them (`fuse: true`: baked in before quantizing) or drop `quantize:`",
            )
        )
    return out
