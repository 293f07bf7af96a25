"""Artifact directory -> pipeline on a device, offline, weights already in their final dtype."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.artifact import PIPELINE_DIR, TORCH_DTYPES, ArtifactError, Manifest, absent_components, read_manifest
from runtime.fastload import Verifier, Warmer, preload_components, weight_files
from runtime.gate import ModeGate
from runtime.integrity import VerifyMode, integrity_error, remember_verified, stat_files, unverified
from runtime.refiner import load_refiner
from runtime.settings import verify_mode

# Artifacts are complete: nothing at serve time may reach the Hub. Set before diffusers or
# huggingface_hub are imported (the loader imports them lazily, after this line).
OFFLINE_BY_US = "HF_HUB_OFFLINE" not in os.environ  # a child compiler (runtime.bootstrap) drops ours
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger(__name__)

_SHARED = "shared"  # Loaded.generation's mode for generations that run side by side


@dataclass
class Loaded:
    path: Path
    manifest: Manifest
    pipeline: Any  # the pipeline loaded from disk (manifest.pipeline_class)
    device: str
    load_seconds: float
    # task -> the pipeline that serves it, all derived at load from `pipeline` (see task_pipelines)
    pipelines: dict[str, Any] = field(default_factory=dict)
    lora_adapters: dict[str, str] = field(default_factory=dict)  # switchable LoRA name -> adapter
    controlnets: dict[str, Any] = field(default_factory=dict)  # name -> ControlNetModel
    _controlnet_pipelines: dict[tuple[str, ...], Any] = field(default_factory=dict)
    _gate: ModeGate | None = None  # made on first use: see loras()
    _derive_lock: threading.Lock = field(default_factory=threading.Lock)
    low_memory: tuple[str, ...] = ()  # what enable_low_memory() turned on, in order
    refiner: Any = None  # the SDXL refiner (runtime.refiner), when the manifest has one
    # Whole generations: shared by default, one at a time when takes_turns (see generation()).
    _turns: ModeGate = field(default_factory=lambda: ModeGate(lambda mode: None))

    @staticmethod
    def offloads(manifest: Manifest, device: str) -> bool:
        """Whether runtime.optimize installs the manifest's offload hooks on this device (CUDA
        only: elsewhere the weights already live in CPU memory)."""
        return manifest.runtime.offload != "none" and device.startswith("cuda")

    @property
    def takes_turns(self) -> bool:
        """Whether generations of this artifact must run one at a time: with offload hooks on the
        shared modules (diffusers moves modules between devices per call, and every call ends in
        maybe_free_model_hooks, which re-installs the hooks on the shared modules), and in
        low-memory mode (it ran out of memory: one generation at a time is what fits)."""
        return self.offloads(self.manifest, self.device) or bool(self.low_memory)

    @contextmanager
    def generation(self) -> Iterator[bool]:
        """Hold for a whole generation of this artifact (denoise and decode; a batch's members
        each hold it). Yields whether it is held alone (takes_turns): then nothing else of the
        artifact runs meanwhile, and the caller must not batch. Otherwise generations share it,
        and only enable_low_memory waits for them. Fair: arrivals are served in order
        (runtime.gate.ModeGate: one shared mode, and a mode of its own per exclusive holder).
        The outermost lock of a generation: the LoRA gate and the VAE upcast lock nest inside."""
        while True:
            alone = self.takes_turns
            with self._turns.hold(object() if alone else _SHARED):
                # The mode only ever turns on, under the exclusive hold: checked again once in.
                if alone or not self.takes_turns:
                    yield alone
                    return

    def loras(self, chosen: tuple[tuple[str, float], ...]) -> AbstractContextManager[None]:
        """Hold for a request's denoise phase (runtime.generate.denoise): its switchable LoRAs on
        at their scales, and nobody else's. The layers are shared by every task pipeline (same
        modules), so one switch serves all of them. Requests wanting the same set (names and
        scales; the empty set: all off) run together; another set waits until they are done
        (runtime.gate.ModeGate). An artifact without switchable LoRAs has nothing to guard."""
        if not self.lora_adapters:
            return nullcontext()
        if self._gate is None:
            with self._derive_lock:
                if self._gate is None:
                    self._gate = ModeGate(self._switch_loras)
        return self._gate.hold(tuple(chosen))

    def _switch_loras(self, chosen: Any) -> None:
        pipe = self.pipeline
        if chosen:
            pipe.enable_lora()
            pipe.set_adapters([self.lora_adapters[n] for n, _ in chosen], adapter_weights=[s for _, s in chosen])
        else:
            pipe.disable_lora()

    def enable_low_memory(self) -> tuple[str, ...]:
        """After an out-of-memory: the memory savers diffusers offers, on for this artifact from
        now on (a worker that ran out once will again): VAE tiling and slicing, attention slicing,
        and on CUDA model CPU offload. Returns what it turned on. Each changes the shared
        modules (attention processors, VAE flags, offload hooks), so it waits for the running
        generations of this artifact and holds off new ones (Loaded.generation) while it works;
        from then on they take turns. Never call it inside generation() (it would wait for
        itself)."""
        with self._turns.hold(object()), self._derive_lock:
            if self.low_memory:
                return self.low_memory
            done = []
            vae = getattr(self.pipeline, "vae", None)
            if vae is not None and hasattr(vae, "enable_tiling"):
                vae.enable_tiling()
                vae.enable_slicing()
                done += ["VAE tiling", "VAE slicing"]
            # Not with hypernetworks: slicing swaps every attention processor, theirs included.
            unet = getattr(self.pipeline, "unet", None)
            if (
                hasattr(self.pipeline, "enable_attention_slicing")
                and unet is not None
                and not self.manifest.hypernetworks
            ):
                # "max": one slice per head, the least memory; "auto" (head_dim // 2) is 0 for
                # models with a head width of 1 and divides by it.
                self.pipeline.enable_attention_slicing("max")
                done.append("attention slicing")
            if self.device.startswith("cuda") and not getattr(self.pipeline, "_all_hooks", None):
                # Every task pipeline shares these modules: offloading them through the loaded
                # pipeline moves them for all (diffusers' hooks follow the modules). Not twice:
                # an artifact compiled with offload has its hooks already.
                self.pipeline.enable_model_cpu_offload(device=self.device)
                done.append("model CPU offload")
            self.low_memory = tuple(done)
            return self.low_memory

    def controlnet_pipeline(self, names: tuple[str, ...]) -> Any:
        """The ControlNet pipeline for these ControlNets (in order), derived from the loaded one
        with from_pipe (shared UNet, VAE, text encoders) once per combination, then reused."""
        with self._derive_lock:  # two requests naming a new combination derive it once
            return self._controlnet_pipeline(names)

    def _controlnet_pipeline(self, names: tuple[str, ...]) -> Any:
        if names not in self._controlnet_pipelines:
            import diffusers

            models = [self.controlnets[n] for n in names]
            cls = getattr(diffusers, self.manifest.capabilities.pipelines["controlnet"])
            controlnet = models[0] if len(models) == 1 else diffusers.MultiControlNetModel(models)
            self._controlnet_pipelines[names] = _derive(self.pipeline, cls, controlnet=controlnet)
        return self._controlnet_pipelines[names]


def transformers_logging() -> Any:
    from transformers.utils import logging as tlog

    return tlog


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(artifact_dir: Path, device: str | None = None, verify: VerifyMode | None = None) -> Loaded:
    """Load an artifact, checking its files against the manifest as it reads them (``verify``,
    default UIW_VERIFY, read by runtime.settings.verify_mode): a missing or resized file fails
    before any model work, a file with other bytes fails the load once the hashing thread has
    seen it (runtime.integrity.IntegrityError)."""
    t0 = time.perf_counter()
    manifest = read_manifest(artifact_dir)
    mode = verify or verify_mode()
    stamps, problems = stat_files(artifact_dir, manifest)
    if problems:
        raise integrity_error(artifact_dir, manifest, problems)
    pending = unverified(artifact_dir, manifest, stamps, mode)
    import diffusers
    import torch

    diffusers.utils.logging.disable_progress_bar()
    transformers_logging().disable_progress_bar()
    device = device or default_device()
    cls = getattr(diffusers, manifest.pipeline_class)
    folder = Path(artifact_dir) / PIPELINE_DIR
    dtype = getattr(torch, TORCH_DTYPES[manifest.runtime.dtype])
    # The weights are read (and on the CPU mapped in) by a thread while the models are built:
    # a returned load has every tensor resident (runtime.fastload; bench/RESULTS.md). Another
    # hashes what the memo does not vouch for; a mismatch fails the load when the block ends.
    with Verifier(Path(artifact_dir), manifest, pending), Warmer(weight_files(folder), fault=device == "cpu") as warmer:
        # Quantized weights load through diffusers' quantizer hooks: left to the pipeline's own loader.
        given = preload_components(folder, dtype, warmer) if manifest.runtime.quantize == "none" else {}
        given |= absent_components(folder)
        # An explicit dtype: without one diffusers upcasts half-precision files to fp32 on load.
        pipe = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **given)
        # from_pretrained leaves everything on the CPU: nothing to move there. With offload
        # (runtime.optimize, below) the hooks place each module themselves: moving them all to
        # the device first would need the memory offload is there to save.
        if device != "cpu" and not Loaded.offloads(manifest, device):
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        pipelines = task_pipelines(pipe, manifest)  # Python work: overlaps the warmer's page faults
    if pending:
        remember_verified(artifact_dir, manifest, stamps)  # the next load of unchanged files hashes nothing
    adapters = load_switchable_loras(pipe, manifest, Path(artifact_dir))
    controlnets = load_controlnets(manifest, Path(artifact_dir), pipe.dtype, device)
    refiner = load_refiner(manifest, Path(artifact_dir), pipe, dtype, device)
    if manifest.hypernetworks:  # attention processors: before the options that may trace them (compile)
        from runtime.hypernetworks import install

        install(pipe.unet, Path(artifact_dir), manifest.hypernetworks)
    # The manifest's runtime options (channels_last, fused QKV, attention, offload, compile and
    # its cache), applied to the shared modules after every adapter is in place.
    from runtime.optimize import apply

    apply(pipe, manifest.runtime, device, Path(artifact_dir))
    seconds = time.perf_counter() - t0
    log.info(
        "loaded %s (%s, %s) on %s in %.2f s (%d of %d files hashed, verify=%s)",
        manifest.recipe,
        manifest.cache_key[:12],
        manifest.runtime.dtype,
        device,
        seconds,
        len(pending),
        len(manifest.files),
        mode,
    )
    loaded = Loaded(Path(artifact_dir), manifest, pipe, device, seconds, pipelines, adapters, controlnets)
    loaded.refiner = refiner
    return loaded


def load_switchable_loras(pipe: Any, manifest: Manifest, artifact_dir: Path) -> dict[str, str]:
    """Each `fuse: false` LoRA loaded as a named adapter (internal names: a user's name could
    clash with a torch.nn.Module attribute), then all disabled: requests turn theirs on."""
    adapters = {}
    for i, lora in enumerate(lora for lora in manifest.loras if lora.file):
        assert lora.file is not None
        adapters[lora.name] = f"uiw_lora_{i}"
        pipe.load_lora_weights(str(artifact_dir / lora.file), adapter_name=adapters[lora.name])
    if adapters:
        pipe.disable_lora()
    return adapters


def load_controlnets(manifest: Manifest, artifact_dir: Path, dtype: Any, device: str) -> dict[str, Any]:
    if not manifest.controlnets:
        return {}
    from diffusers import ControlNetModel

    return {
        c.name: ControlNetModel.from_pretrained(artifact_dir / c.path, dtype=dtype, local_files_only=True).to(device)
        for c in manifest.controlnets
    }


def _derive(pipe: Any, cls: Any, **components: Any) -> Any:
    """``cls.from_pipe`` with its two leaks kept out (see task_pipelines)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if any(getattr(m, "is_quantized", False) for m in pipe.components.values()):
        # from_pipe casts every component to `dtype`, which diffusers refuses for a quantized model
        # even when the dtype is unchanged: the constructor gets the same components as they are.
        import inspect

        params = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
        given = {n: pipe.components[n] if n in pipe.components else pipe.config[n] for n in params if n in pipe.config}
        derived = cls(**{**given, "scheduler": scheduler, **components})
    else:
        derived = cls.from_pipe(pipe, scheduler=scheduler, dtype=pipe.dtype, **components)
    derived.set_progress_bar_config(disable=True)
    return derived


def _dtypes(pipe: Any) -> dict[str, frozenset[Any]]:
    import torch

    return {
        name: frozenset(p.dtype for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def task_pipelines(pipe: Any, manifest: Manifest) -> dict[str, Any]:
    """task -> pipeline, every one built once, at load, from the loaded one with diffusers'
    ``from_pipe``: the same UNet/transformer, VAE, text encoders and tokenizers objects, so
    img2img and inpaint cost no memory beyond a few Python objects, and nothing is built while a
    request waits. Eager rather than lazy: a task that cannot be derived fails the load with the
    artifact named, not a request later.

    Two things of from_pipe's that would leak into the shared components are kept out:
    - it casts every component to its `dtype` argument, float32 when none is given, in place: an
      fp16 artifact would silently turn fp32 for every task. The loaded pipeline's dtype is
      passed, and the component dtypes are checked unchanged.
    - a new pipeline's __init__ may rewrite its scheduler's config (SD's steps_offset,
      clip_sample, skip_prk_steps "fixes"; the inpaint pipeline has one the txt2img one has not),
      so each derived pipeline gets its own scheduler, made from the loaded one's config.
    """
    import diffusers

    classes = dict(manifest.capabilities.pipelines)
    if not classes:  # manifests from before per-task classes: the one loaded pipeline, one task
        classes = {manifest.capabilities.tasks[0]: manifest.pipeline_class}
    before = _dtypes(pipe)
    out: dict[str, Any] = {}
    for task in manifest.capabilities.tasks:
        if task == "controlnet":  # one per set of ControlNets a request names: Loaded.controlnet_pipeline
            continue
        name = classes.get(task)
        cls = getattr(diffusers, name, None) if name else None
        if cls is None:
            raise ArtifactError(
                f"manifest of {manifest.recipe} ({manifest.cache_key[:12]}): the {task} task has "
                f"{'no pipeline class' if not name else f'pipeline class {name!r}, which this diffusers lacks'}. "
                "hint: recompile the recipe with the compiler that matches this runtime."
            )
        if cls is type(pipe):
            out[task] = pipe
            continue
        out[task] = _derive(pipe, cls)
    if _dtypes(pipe) != before:
        raise RuntimeError(f"deriving the task pipelines changed component dtypes: {before} -> {_dtypes(pipe)}")
    return out
