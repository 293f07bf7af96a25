"""Staged pipeline folder -> finished artifact: hash every file, write manifest.json, READY last."""

from __future__ import annotations

from pathlib import Path

from compiler.generic_build import GenericBuilt
from compiler.plan import BuildPlan
from compiler.store import utc_now
from runtime.artifact import (
    FORMAT_VERSION,
    LORA_DIR,
    MANIFEST,
    READY,
    Capabilities,
    ControlNetInfo,
    EmbeddingInfo,
    FileEntry,
    LoraInfo,
    Manifest,
    Serving,
    content_digest,
    fsync_path,
    sha256_file,
    write_json_atomic,
)


def hash_tree(root: Path) -> tuple[FileEntry, ...]:
    """Hash every file (and fsync it: READY promises the bytes are on disk, not in the page cache)."""
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, READY):
            fsync_path(p)
            entries.append(FileEntry(path=p.relative_to(root).as_posix(), sha256=sha256_file(p), size=p.stat().st_size))
    return tuple(entries)


def package(
    staging: Path,
    plan: BuildPlan,
    key: str,
    components: dict[str, str],
    environment: dict[str, str],
    provenance: dict[str, str],
    embeddings: tuple[EmbeddingInfo, ...] = (),
    controlnets: tuple[ControlNetInfo, ...] = (),
    generic: GenericBuilt | None = None,
) -> Manifest:
    files = hash_tree(staging)
    # A generic family's serving and tasks were read from its pipeline class at build.
    serving = (
        generic.serving if generic else Serving(scheduler=plan.scheduler, defaults=plan.defaults, limits=plan.limits)
    )
    tasks = generic.tasks if generic else plan.tasks
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        cache_key=key,
        content_digest=content_digest(files),
        recipe=plan.recipe,
        family=plan.family,
        pipeline_class=plan.pipeline_class,
        components=components,
        serving=serving,
        capabilities=Capabilities(tasks=tuple(tasks), pipelines=dict(tasks)),
        call=generic.call if generic else None,
        embeddings=embeddings,
        controlnets=controlnets,
        loras=tuple(
            LoraInfo(
                name=lora.name,
                scale=lora.scale,
                fused=lora.fuse,
                file=None if lora.fuse else f"{LORA_DIR}/{lora.name}.safetensors",
            )
            for lora in plan.loras
        ),
        runtime=plan.runtime,
        environment=environment,
        provenance=dict(provenance),
        inputs=tuple(
            sorted(
                {
                    sha.removeprefix("sha256:")
                    for _, sha in (*plan.base_inputs, *plan.checkpoint_inputs, *plan.adapter_inputs)
                }
            )
        ),
        files=files,
        created_at=utc_now(),
    )
    write_json_atomic(staging / MANIFEST, manifest.model_dump(mode="json"))
    # READY last: its presence is the promise that everything above is complete and fsynced.
    write_json_atomic(staging / READY, {"cache_key": key, "content_digest": manifest.content_digest})
    return manifest
