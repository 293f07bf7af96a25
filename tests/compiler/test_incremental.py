"""Incremental rebuilds: a single-file checkpoint is converted once per (file, configs, precision,
versions) and kept in the store (compiler/converted_bases.py). A recompile of an unchanged recipe is a
cache hit that imports no torch; a LoRA-scale change loads the converted base instead of calling
the single-file converter and downloads nothing. Checked against independent references: the LoRA
math on the tiny builtin's own weights (tests/compiler/test_lora.py), and a cold build of the same recipe in
a fresh store (one content digest whichever way the base was obtained)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler.families import FAMILIES
from tests.compiler.test_lora import _check, _factors, kohya_file
from tests.compiler.test_sources import compile_recipe
from tests.conftest import DEMO_SETTINGS, PY, REPO, REQ, child_env, run_store, serve
from tests.helpers.fakehub import FakeHub, tree

SD15_CONFIGS = FAMILIES["sd15"].config_repo.removeprefix("hf://")
ALPHA = 2.0
RECIPE = (
    "checkpoint: ./tiny.safetensors\n" + DEMO_SETTINGS + "loras:\n  - source: ./style.safetensors\n    scale: {scale}\n"
)


@pytest.fixture(scope="module")
def tiny() -> object:
    from compiler.tiny_models import BUILTINS

    return BUILTINS["tiny-sd15"].build()


@pytest.fixture(scope="module")
def base(tiny) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.clone() for k, v in getattr(tiny, c).state_dict().items()} for c in ("unet", "text_encoder")}


@pytest.fixture(scope="module")
def config_hub(tmp_path_factory: pytest.TempPathFactory, tiny) -> Iterator[FakeHub]:
    """The SD 1.5 config repo (the tiny model's configs and tokenizer, no weights) on the loopback
    Hub: a base-less checkpoint's configs are fetched from it into the blob store."""
    folder = tmp_path_factory.mktemp("sd15-configs")
    tiny.save_pretrained(folder)
    hub = FakeHub().start()
    hub.repo(SD15_CONFIGS).push({p: b for p, b in tree(folder).items() if not p.endswith(".safetensors")})
    yield hub
    hub.stop()


@pytest.fixture()
def stack(tmp_path: Path, tiny, base) -> dict:
    """The builtin as an LDM single file, and one kohya LoRA on UNet and text-encoder modules."""
    from safetensors.torch import save_file

    from tests.helpers.ldm import pipeline_to_ldm

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    save_file(pipeline_to_ldm(tiny), recipes / "tiny.safetensors")
    factors = _factors(base, 3)
    kohya_file(recipes / "style.safetensors", factors, alpha=ALPHA)
    return {"factors": factors}


def _compile(tmp_path: Path, hub: FakeHub, scale: float, home: Path | None = None):
    text = RECIPE.format(scale=scale)
    return compile_recipe(tmp_path, home or tmp_path / "home", hub, "", text=text, env={"UIW_LOG_LEVEL": "INFO"})


def _blobs(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "blobs" / "sha256").iterdir())


def _entries(home: Path) -> list[Path]:
    root = home / "converted" / "v1"
    return sorted(p for p in root.iterdir() if (p / "READY").is_file()) if root.is_dir() else []


def _manifest(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def _conversions(stderr: str) -> list[tuple[str, str]]:
    return re.findall(r"converted base: (hit|miss) ([0-9a-f]{64})", stderr)


def test_lora_scale_change_reuses_the_converted_base_and_every_blob(tmp_path, config_hub, stack, base):
    home = tmp_path / "home"
    first = _compile(tmp_path, config_hub, 1.0)
    assert first.returncode == 0, first.stderr[-3000:]
    (miss,) = _conversions(first.stderr)
    assert miss[0] == "miss"
    key = miss[1]
    (entry,) = _entries(home)
    assert entry.name == key
    one = Path(first.stdout.strip())
    assert _manifest(one)["provenance"]["converted"] == f"converted/v1/{key}"
    _check(one, base, [(stack["factors"], 1.0, ALPHA)])
    blobs = _blobs(home)
    assert blobs  # the config repo's files came through the blob store

    _assert_unchanged_recompile_is_a_torch_free_hit(tmp_path, home, config_hub, first)

    # Only the LoRA's scale changed: the converted base is loaded, not converted; nothing is fetched.
    t0 = time.perf_counter()
    second = _compile(tmp_path, config_hub, 0.5)
    seconds = time.perf_counter() - t0
    assert second.returncode == 0, second.stderr[-3000:]
    assert _conversions(second.stderr) == [("hit", key)]
    assert _blobs(home) == blobs and _entries(home) == [entry]
    two = Path(second.stdout.strip())
    assert two != one and _manifest(two)["provenance"]["converted"] == f"converted/v1/{key}"
    print(f"scale-only rebuild: {seconds:.2f} s")
    # The weights are the LoRA math at the new scale, on the checkpoint's (the builtin's) weights.
    _check(two, base, [(stack["factors"], 0.5, ALPHA)])
    image_one, image_two = serve(home, one, REQ), serve(home, two, REQ)
    assert image_one.shape == image_two.shape and not np.array_equal(image_one, image_two)
    _assert_shares_only_what_the_lora_left_alone(one, two, entry)

    # A cold build of the same recipe in a fresh store (converter called) is the same artifact.
    cold = _compile(tmp_path, config_hub, 0.5, home=tmp_path / "fresh")
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert _conversions(cold.stderr) == [("miss", key)]
    assert _manifest(Path(cold.stdout.strip()))["content_digest"] == _manifest(two)["content_digest"]

    _assert_store_commands_list_the_entry(home, key, users=(one, two))


def _assert_unchanged_recompile_is_a_torch_free_hit(tmp_path: Path, home: Path, hub: FakeHub, first) -> None:
    """Unchanged: a cache hit that neither converts nor imports torch (nor diffusers)."""
    t0 = time.perf_counter()
    again = compile_recipe(tmp_path, home, hub, "", text=RECIPE.format(scale=1.0), env={"PYTHONPROFILEIMPORTTIME": "1"})
    seconds = time.perf_counter() - t0
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time")}
    assert "compiler.cli" in imported and not {"torch", "diffusers", "transformers"} & imported
    assert "converted base" not in again.stderr
    print(f"unchanged recompile: {seconds:.2f} s (subprocess, imports included)")


def _assert_shares_only_what_the_lora_left_alone(one: Path, two: Path, entry: Path) -> None:
    """What the LoRA leaves alone (the VAE) is one file on disk, shared with the converted base;
    the unet the LoRA changed is the artifact's own file."""
    vae = "pipeline/vae/diffusion_pytorch_model.safetensors"
    assert (two / vae).stat().st_ino == (entry / vae).stat().st_ino == (one / vae).stat().st_ino
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert (two / unet).stat().st_ino != (entry / unet).stat().st_ino


def _assert_store_commands_list_the_entry(home: Path, key: str, users: tuple[Path, ...]) -> None:
    """The store commands: ls lists the converted entry with its users; verify re-hashes it."""
    ls = _store(home, "ls", "--json")
    assert ls.returncode == 0, ls.stderr
    (row,) = json.loads(ls.stdout)["converted"]
    assert row["key"] == key and sorted(row["artifacts"]) == sorted(u.name for u in users)
    verify = _store(home, "verify")
    assert verify.returncode == 0 and "1 converted" in verify.stdout, verify.stdout


def _break_link(path: Path, data: bytes) -> None:
    """Replace the file's bytes without touching other links to its inode (an artifact's)."""
    path.unlink()
    path.write_bytes(data)


def test_a_damaged_or_missing_converted_base_is_converted_again(tmp_path, config_hub, stack, base):
    home = tmp_path / "home"
    first = _compile(tmp_path, config_hub, 1.0)
    assert first.returncode == 0, first.stderr[-3000:]
    ((_, key),) = _conversions(first.stderr)
    entry = home / "converted" / "v1" / key
    unet = entry / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    good = unet.read_bytes()

    # Truncated (a size that disagrees with the record): found by a stat, converted again.
    _break_link(unet, good[: len(good) // 2])
    verify = _store(home, "verify")
    assert verify.returncode == 1 and f"converted {key}" in verify.stdout, verify.stdout
    second = _compile(tmp_path, config_hub, 0.5)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "damaged" in second.stderr and _conversions(second.stderr) == [("miss", key)]
    assert unet.read_bytes() == good
    _check(Path(second.stdout.strip()), base, [(stack["factors"], 0.5, ALPHA)])

    # Garbled at the same size (the safetensors header): the load fails, converted again.
    _break_link(unet, b"\xff" * 8 + good[8:])
    third = _compile(tmp_path, config_hub, 0.25)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "does not load" in third.stderr and _conversions(third.stderr) == [("miss", key)]
    _check(Path(third.stdout.strip()), base, [(stack["factors"], 0.25, ALPHA)])

    # Removed entirely: converted again; the artifacts that shared its files are untouched.
    shutil.rmtree(entry)
    fourth = _compile(tmp_path, config_hub, 0.75)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert _conversions(fourth.stderr) == [("miss", key)]
    verify = _store(home, "verify")
    assert verify.returncode == 0, verify.stdout


def test_gc_keeps_converted_bases_that_kept_artifacts_came_from(tmp_path, config_hub, stack):
    home = tmp_path / "home"
    built = _compile(tmp_path, config_hub, 1.0)
    assert built.returncode == 0, built.stderr[-3000:]
    ((_, key),) = _conversions(built.stderr)
    root = home / "converted" / "v1"
    orphan = root / ("0" * 64)  # an entry no artifact came from (its artifact was collected)
    shutil.copytree(root / key, orphan)
    stale = root / f".staging-{'1' * 64}-1-abcd"  # a fill killed half-way
    stale.mkdir()
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))

    gc = _store(home, "gc", "--recipes", str(tmp_path / "recipes"))
    assert gc.returncode == 0, gc.stderr
    assert (root / key / "READY").is_file() and not orphan.exists() and not stale.exists()
    assert str(orphan) in gc.stdout
    # Once no name keeps the artifact, its converted base goes with it.
    (home / "names" / "r.json").unlink()
    gc = _store(home, "gc", "--recipes", str(tmp_path / "empty"))
    assert gc.returncode == 0, gc.stderr
    assert not (root / key).exists() and not any((home / "artifacts" / "v1").iterdir())


def _store(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_store(home, *args, timeout=120)


@pytest.mark.slow
def test_rebuild_bench_runs_at_tiny_size(tmp_path):
    """bench/rebuild.py end to end on the tiny stack: the claims its JSON makes hold."""
    proc = subprocess.run(
        [PY, "-m", "bench.rebuild", "--size", "tiny", "--repeat", "2", "--workdir", str(tmp_path)],
        cwd=REPO,
        env=child_env(tmp_path / "unused"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cold_converted"] == ["miss"] and result["scale_change_converted"] == ["hit"]
    assert result["unchanged_recompile_imports_torch"] is False
    assert result["blobs_unchanged"] and result["hub_requests_during_scale_change"] == 0
    assert result["same_artifact_either_way"] and result["vae_hard_linked"] and result["new_artifact"]
