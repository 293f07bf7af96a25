"""Single-file checkpoints from every scheme (CivitAI, Hub files, HTTPS URLs, local disks), their
pins and their refusals, against the loopback test Hub and CivitAI: the compiler runs as users run
it, a subprocess with the real clients pointed at the servers."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tests.compiler.test_sources import RECIPE, compile_recipe, sha
from tests.conftest import REQ, serve
from tests.helpers.fakehub import FakeHub

CKPT_RECIPE = RECIPE.replace("base: {base}", "base: builtin:tiny-sd15\ncheckpoint: {base}")


@pytest.fixture(scope="session")
def ldm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The builtin's weights as a CivitAI-style single file (original LDM key layout)."""
    from safetensors.torch import save

    from compiler.tiny_models import BUILTINS
    from tests.helpers.ldm import pipeline_to_ldm

    return save(pipeline_to_ldm(BUILTINS["tiny-sd15"].build()))


def _ckpt_compile(
    tmp_path: Path, hub: FakeHub, source: str, *args: str, env: dict[str, str] | None = None, fetch_only: bool = False
):
    return compile_recipe(
        tmp_path, tmp_path / "home", hub, source, *args, env=env, text=CKPT_RECIPE, fetch_only=fetch_only
    )


def test_civitai_checkpoint_resolve_lock_fetch_compile_serve(tmp_path, hub, ldm_checkpoint, demo_image):
    hub.add_civitai(4201, 130071, b"an older upload", "old.safetensors")
    hub.add_civitai(4201, 130072, ldm_checkpoint, "tinyRealism_v51.safetensors", needs_token=True)
    before = len(hub.log)
    denied = _ckpt_compile(tmp_path, hub, "civitai://models/4201@130072")
    assert denied.returncode == 2 and "CIVITAI_TOKEN" in denied.stderr and "HTTP 401" in denied.stderr

    proc = _ckpt_compile(tmp_path, hub, "civitai://models/4201@130072", env={"CIVITAI_TOKEN": hub.civitai_token})
    assert proc.returncode == 0, proc.stderr
    lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    entry = lock["sources"]["civitai://models/4201@130072"]
    assert entry["pin"] == "civitai-version:130072"
    assert entry["files"][0]["sha256"] == sha(ldm_checkpoint)
    assert (
        entry["meta"]["base_model"] == "SD 1.5" and entry["meta"]["air"] == "urn:air:sd1:checkpoint:civitai:4201@130072"
    )
    assert entry["files"][0]["url"] == "/api/download/models/130072", "the site is a setting, not part of the lock"
    paths = [r.path for r in hub.log[before:]]
    assert "/api/v1/model-versions/130072" in paths and "/api/download/models/130072" in paths
    assert any(p.startswith("/storage/130072/") for p in paths), "followed the redirect to storage"
    assert np.array_equal(serve(tmp_path / "home", Path(proc.stdout.strip()), REQ), demo_image)

    # Every spelling of the same version is the same source: same lock key, same artifact.
    for spelling in (
        "urn:air:sd1:checkpoint:civitai:4201@130072",
        f"{hub.url}/models/4201/tiny-realism?modelVersionId=130072",
    ):
        again = _ckpt_compile(tmp_path, hub, spelling, env={"CIVITAI_TOKEN": hub.civitai_token})
        assert again.returncode == 0 and again.stdout == proc.stdout, again.stderr
    written = [p for root in (tmp_path / "home", tmp_path / "recipes") for p in root.rglob("*") if p.is_file()]
    assert not [p for p in written if hub.civitai_token.encode() in p.read_bytes()]
    assert hub.civitai_token not in proc.stderr


def test_civitai_latest_version_is_pinned_and_errors_list_alternatives(tmp_path, hub, ldm_checkpoint):
    hub.add_civitai(777, 7001, ldm_checkpoint, "a.safetensors")
    proc = _ckpt_compile(tmp_path, hub, "civitai://models/777", fetch_only=True)
    assert proc.returncode == 0, proc.stderr
    lock_file = tmp_path / "recipes" / "r.lock.json"
    assert json.loads(lock_file.read_text())["sources"]["civitai://models/777"]["pin"] == "civitai-version:7001"
    hub.add_civitai(777, 7002, b"a newer upload", "b.safetensors")
    same = _ckpt_compile(tmp_path, hub, "civitai://models/777", fetch_only=True)
    assert same.stdout == proc.stdout, "a newer version does not move the lock until lock=update"
    newer = _ckpt_compile(tmp_path, hub, "civitai://models/777", "lock=update", fetch_only=True)
    assert json.loads(lock_file.read_text())["sources"]["civitai://models/777"]["pin"] == "civitai-version:7002"
    assert newer.returncode == 2 and "not a safetensors file" in newer.stderr  # b"a newer upload"

    missing = _ckpt_compile(tmp_path, hub, "civitai://models/777@9999")
    assert missing.returncode == 2 and "has no version 9999" in missing.stderr
    assert "7002 (v7002)" in missing.stderr and "7001 (v7001)" in missing.stderr
    wrong_model = _ckpt_compile(tmp_path, hub, "civitai://models/1@7001")
    assert wrong_model.returncode == 2 and "civitai://models/777@7001" in wrong_model.stderr
    hub.add_civitai(778, 7801, b"PK\x03\x04 a zipped pickle", "old.ckpt")
    hub.versions[7801].files[0]["metadata"]["format"] = "PickleTensor"
    pickle = _ckpt_compile(tmp_path, hub, "civitai://models/778@7801")
    assert pickle.returncode == 2 and "no safetensors weights" in pickle.stderr


def test_https_hf_file_and_local_checkpoints_compile_to_the_same_model(tmp_path, hub, ldm_checkpoint, demo_image):
    hub.files["models/tiny.safetensors"] = ldm_checkpoint
    hub.add_civitai(4203, 140003, ldm_checkpoint, "tiny.safetensors")
    digest = hashlib.sha256(ldm_checkpoint).hexdigest()
    hub.repo("uiw-test/single").push({"tiny-ldm.safetensors": ldm_checkpoint, "README.md": b"x"})
    local = tmp_path / "recipes" / "weights" / "tiny.safetensors"
    local.parent.mkdir(parents=True)
    local.write_bytes(ldm_checkpoint)
    outputs = set()
    for source in (
        f"{hub.url}/files/models/tiny.safetensors#sha256={digest}",  # pinned: no call at lock time
        f"{hub.url}/files/models/tiny.safetensors",  # unpinned: hashed when locked
        "hf://uiw-test/single/tiny-ldm.safetensors",
        "./weights/tiny.safetensors",
    ):
        # The local file is also looked up on CivitAI by its hash (opt-in), as a user who
        # downloaded it there by hand would want: the lock then records its baseModel and AIR.
        lookup = {"UIW_CIVITAI_LOOKUP": "1"} if source.startswith("./") else {}
        proc = _ckpt_compile(tmp_path, hub, source, env=lookup)
        assert proc.returncode == 0, proc.stderr[-600:]
        lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
        (entry,) = [e for k, e in lock["sources"].items() if k != "builtin:tiny-sd15"]
        assert entry["files"][0]["sha256"] == f"sha256:{digest}", source
        if lookup:
            assert entry["meta"]["civitai"]["base_model"] == "SD 1.5", entry["meta"]
            found = hub.versions[entry["meta"]["civitai"]["version_id"]]  # the API record of these bytes
            assert found.files[0]["hashes"]["SHA256"] == digest.upper()
            assert entry["meta"]["civitai"]["air"] == f"urn:air:sd1:checkpoint:civitai:{found.model_id}@{found.id}"
        else:
            assert "civitai" not in entry["meta"], "no lookup unless asked: it tells CivitAI your file's hash"
        outputs.add(proc.stdout)
    assert len(outputs) == 1, "same bytes, same artifact, whatever the scheme"
    assert np.array_equal(serve(tmp_path / "home", Path(outputs.pop().strip()), REQ), demo_image)

    # The lock pins the local file's bytes: a changed file is drift for lock=locked...
    local.write_bytes(ldm_checkpoint + b"")  # same bytes, new mtime: the memo rehashes, nothing changes
    assert _ckpt_compile(tmp_path, hub, "./weights/tiny.safetensors", "lock=locked").returncode == 0
    local.write_bytes(b"\x80\x04 a pickle now")
    changed = _ckpt_compile(tmp_path, hub, "./weights/tiny.safetensors", "lock=locked")
    assert changed.returncode == 2 and "~ " + str(local) + " (its bytes changed" in changed.stderr
    # ...and lock=auto relocks it, then refuses the pickle before any loader sees it.
    relock = _ckpt_compile(tmp_path, hub, "./weights/tiny.safetensors")
    assert relock.returncode == 2 and "is a pickle" in relock.stderr


def test_local_hash_memo_makes_a_no_op_recompile_cheap(tmp_path):
    """A multi-GB local file is hashed once; the memo answers by (path, size, mtime_ns, inode)."""
    from compiler.sources.local import HashMemo

    big = tmp_path / "big.safetensors"
    with big.open("wb") as f:  # sparse: 2 GiB on paper, nothing on disk
        f.truncate(2 * 1024**3)
    memo_path = tmp_path / "memo.json"
    t0 = time.perf_counter()
    first = HashMemo(memo_path)
    digest = first.sha256(big)
    first.save()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert HashMemo(memo_path).sha256(big) == digest
    warm = time.perf_counter() - t0
    assert warm < 0.5 < cold, (cold, warm)
    os.utime(big, ns=(time.time_ns(), time.time_ns()))  # touched: hashed again
    again = HashMemo(memo_path)
    again.sha256(big)
    assert again._dirty


def test_local_diffusers_folder_is_pinned_file_by_file(tmp_path, hub, tiny_tree, demo_image):
    folder = tmp_path / "recipes" / "tiny"
    for rel, data in tiny_tree.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    proc = compile_recipe(tmp_path, tmp_path / "home", hub, "./tiny")
    assert proc.returncode == 0, proc.stderr
    lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    entry = lock["sources"][str(folder)]
    assert entry["kind"] == "folder" and entry["pin"].startswith("sha256:")
    assert {f["path"]: f["sha256"] for f in entry["files"]} == {
        p: sha(d) for p, d in tiny_tree.items() if p.endswith((".json", ".txt", ".safetensors"))
    }
    assert np.array_equal(serve(tmp_path / "home", Path(proc.stdout.strip()), REQ), demo_image)


def test_disk_full_leaves_nothing_partial(tmp_path, hub, monkeypatch):
    import errno

    from compiler.sources import download

    hub.files["big.safetensors"] = b"x" * 100_000
    real = download._write

    def full(r, part, bar):  # some bytes land, then the disk is full
        real(r, part, bar)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "_write", full)
    partial = tmp_path / "partial" / "x.part"
    with pytest.raises(download.DiskFull, match="disk full") as e:
        download.download(
            f"{hub.url}/files/big.safetensors",
            {},
            tmp_path / "blob",
            partial,
            expected_sha256=None,
            expected_size=None,
            label="big",
            policy=download.Policy(),
        )
    assert "nothing partial was kept" in str(e.value)
    assert not partial.exists() and not (tmp_path / "blob").exists()


def test_a_checkpoint_of_another_family_fails_before_any_build(tmp_path, hub, ldm_checkpoint):
    from tests.compiler.test_detect import write

    (tmp_path / "recipes").mkdir()
    sdxl_like = write(
        tmp_path / "recipes" / "sdxl.safetensors",
        {
            "model.diffusion_model.input_blocks.0.0.weight": ((320, 4, 3, 3), "float16"),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": ((640, 2048), "float16"),
            "model.diffusion_model.label_emb.0.0.weight": ((1280, 2816), "float16"),
            "conditioner.embedders.1.model.ln_final.weight": ((1280,), "float16"),
        },
    )
    wrong = _ckpt_compile(tmp_path, hub, str(sdxl_like))
    assert wrong.returncode == 2, wrong.stderr
    assert "this checkpoint is sdxl but the base is sd15" in wrong.stderr
    assert "label_emb.0.0.weight [1280, 2816]" in wrong.stderr, "the evidence is named"
    assert not list((tmp_path / "home").glob("artifacts/v1/*/READY"))

    hub.add_civitai(9001, 90011, ldm_checkpoint, "mislabelled.safetensors", base_model="SDXL 1.0")
    mislabelled = _ckpt_compile(tmp_path, hub, "civitai://models/9001@90011")
    assert mislabelled.returncode == 2
    assert "CivitAI lists this file as 'SDXL 1.0' (sdxl), but its weights are sd15" in mislabelled.stderr


class _Evil:
    """Unpickling this runs a command: what a malicious .ckpt on a model site does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_never_execute_and_benign_ones_convert_when_allowed(tmp_path, hub, ldm_checkpoint):
    import torch
    from safetensors.torch import load

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    marker = tmp_path / "PWNED"
    state = load(ldm_checkpoint)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker)}, recipes / "evil.ckpt")  # zip container
    torch.save(_Evil(marker), recipes / "evil-legacy.ckpt", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": state, "global_step": 1000}, recipes / "benign.ckpt")
    allow = CKPT_RECIPE + "allow_pickle: true\n"
    for name in ("evil.ckpt", "evil-legacy.ckpt"):
        refused = _ckpt_compile(tmp_path, hub, f"./{name}")
        assert refused.returncode == 2 and f"{name} is a pickle" in refused.stderr and "allow_pickle" in refused.stderr
        allowed = compile_recipe(tmp_path, tmp_path / "home", hub, f"./{name}", text=allow)
        assert allowed.returncode == 2, allowed.stderr
        assert f"{name} needs code to unpickle" in allowed.stderr and "nothing in it ran" in allowed.stderr
    assert not marker.exists(), "a pickle ran code"

    (recipes / "weights.safetensors").write_bytes(ldm_checkpoint)
    twin = _ckpt_compile(tmp_path, hub, "./weights.safetensors")
    benign = compile_recipe(tmp_path, tmp_path / "home", hub, "./benign.ckpt", text=allow)
    assert twin.returncode == 0 and benign.returncode == 0, twin.stderr + benign.stderr
    digest = [
        json.loads((Path(p.stdout.strip()) / "manifest.json").read_text())["content_digest"] for p in (twin, benign)
    ]
    assert digest[0] == digest[1], "the converted pickle builds the same artifact bytes as its safetensors twin"
