"""Sources, lockfile and store against loopback servers that speak the Hub and CivitAI APIs.

The compiler runs as users run it (a subprocess, `python -m compiler recipe=…`), with the real
huggingface_hub client pointed at the fake Hub through HF_ENDPOINT and the CivitAI client through
CIVITAI_BASE_URL. Faults are injected on the server; what the server saw proves resume and dedup.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO_SETTINGS, PY, REPO, REQ, child_env, run_compiler, serve
from tests.helpers.fakehub import FakeHub, tree

TINY = "uiw-test/tiny-sd15"
RECIPE = "base: {base}\n" + DEMO_SETTINGS


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The builtin tiny SD 1.5 as a HuggingFace diffusers repo: fp32 weights, fp16 variants, and
    files a pipeline never reads (a pickled duplicate, a README, an image)."""
    import torch

    from compiler.tiny_models import BUILTINS

    folder = tmp_path_factory.mktemp("tiny-repo")
    pipe = BUILTINS["tiny-sd15"].build()
    pipe.save_pretrained(folder)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    files = tree(folder)
    files["unet/diffusion_pytorch_model.bin"] = b"not a pickle anyone should load"
    files["README.md"] = b"# tiny\n"
    files["sample.png"] = b"\x89PNG fake"
    return files


@pytest.fixture(scope="session")
def hub(tiny_tree: dict[str, bytes]) -> Iterator[FakeHub]:
    h = FakeHub().start()
    h.repo(TINY).push(tiny_tree)
    yield h
    h.stop()


def compile_recipe(
    tmp: Path,
    home: Path,
    hub: FakeHub,
    base: str,
    *args: str,
    env: dict[str, str] | None = None,
    name: str = "r",
    text: str = RECIPE,
    fetch_only: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`python -m compiler recipe=…`, or with ``fetch_only`` `python -m compiler.store fetch recipe=…`
    (lock and download without building: the same fetch path, without the build's seconds)."""
    recipes = tmp / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / f"{name}.yaml").write_text(text.format(base=base))
    full = {
        "HF_ENDPOINT": hub.url,
        "CIVITAI_BASE_URL": hub.url,
        "HF_HOME": str(tmp / "hf-home"),
        "UIW_HTTP_TIMEOUT": "5",
        "UIW_HTTP_RETRIES": "3",
        **(env or {}),
    }
    cmd = ("fetch",) if fetch_only else ()
    module = "compiler.store" if fetch_only else "compiler"
    return run_compiler(*cmd, f"recipe={name}", f"recipes_dir={recipes}", *args, home=home, env=full, module=module)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gets(hub: FakeHub, part: str) -> list:
    return [r for r in hub.requests(part) if r.method == "GET"]


def test_hf_repo_resolve_lock_fetch_compile_serve(tmp_path, hub, tiny_tree, demo_artifact, home):
    h = tmp_path / "home"
    before = len(hub.log)
    proc = compile_recipe(tmp_path, h, hub, f"hf://{TINY}")
    assert proc.returncode == 0, proc.stderr
    artifact = Path(proc.stdout.strip())

    lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    entry = lock["sources"][f"hf://{TINY}@main"]
    assert entry["pin"] == f"commit:{hub.repos[TINY].refs['main']}"
    files = {f["path"]: f for f in entry["files"]}
    # Pinned by the sha256 of the bytes: LFS files from the API's lfs.sha256, plain files hashed.
    assert all(f["sha256"] == sha(tiny_tree[p]) for p, f in files.items())
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files  # pinned for fp16 builds too
    assert not {"unet/diffusion_pytorch_model.bin", "README.md", "sample.png"} & set(files)

    seen = {r.path for r in hub.log[before:] if r.method == "GET"}
    assert not any(".fp16." in p or p.endswith((".bin", "README.md", ".png")) for p in seen), seen

    # The Hub-served model is the builtin's bytes: same request, same pixels as the demo artifact.
    assert np.array_equal(serve(h, artifact, REQ), serve(home, demo_artifact, REQ))

    # precision=fp16 uses the pinned fp16 variant files and never rewrites the lock.
    lock_bytes = (tmp_path / "recipes" / "r.lock.json").read_bytes()
    proc = compile_recipe(tmp_path, h, hub, f"hf://{TINY}", "precision=fp16")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "recipes" / "r.lock.json").read_bytes() == lock_bytes
    assert gets(hub, "unet/diffusion_pytorch_model.fp16.safetensors")
    manifest = json.loads((Path(proc.stdout.strip()) / "manifest.json").read_text())
    assert manifest["runtime"]["dtype"] == "fp16"
    # The build read (and the cache key hashed) exactly the files of its precision.
    plain, half = (
        hashlib.sha256(tiny_tree[f"unet/diffusion_pytorch_model{v}.safetensors"]).hexdigest() for v in ("", ".fp16")
    )
    assert half in manifest["inputs"] and plain not in manifest["inputs"]
    fp32_inputs = json.loads((artifact / "manifest.json").read_text())["inputs"]
    assert plain in fp32_inputs and half not in fp32_inputs


def test_a_moved_branch_keeps_the_locked_commit_until_relocked(tmp_path, hub, tiny_tree):
    repo = hub.repo("uiw-test/moving")
    first = repo.push(tiny_tree)
    h = tmp_path / "home"
    a = compile_recipe(tmp_path, h, hub, "hf://uiw-test/moving")
    assert a.returncode == 0, a.stderr
    moved = dict(tiny_tree)
    cfg = json.loads(moved["scheduler/scheduler_config.json"])
    moved["scheduler/scheduler_config.json"] = json.dumps({**cfg, "steps_offset": 0}).encode()
    second = repo.push(moved)
    assert second != first

    b = compile_recipe(tmp_path, h, hub, "hf://uiw-test/moving")
    assert b.returncode == 0, b.stderr
    assert b.stdout == a.stdout, "lock=auto keeps the pinned commit: same artifact"
    lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    assert lock["sources"]["hf://uiw-test/moving@main"]["pin"] == f"commit:{first}"

    c = compile_recipe(tmp_path, h, hub, "hf://uiw-test/moving", "lock=update")
    assert c.returncode == 0, c.stderr
    assert c.stdout != a.stdout
    lock = json.loads((tmp_path / "recipes" / "r.lock.json").read_text())
    assert lock["sources"]["hf://uiw-test/moving@main"]["pin"] == f"commit:{second}"
    assert f"commit:{first} -> commit:{second}" in c.stderr


def test_lock_modes_locked_fails_on_drift_and_frozen_makes_no_metadata_calls(tmp_path, hub):
    h = tmp_path / "home"
    ok = compile_recipe(tmp_path, h, hub, f"hf://{TINY}", fetch_only=True)
    assert ok.returncode == 0, ok.stderr
    lock_file = tmp_path / "recipes" / "r.lock.json"
    locked = lock_file.read_bytes()

    before = len(hub.log)
    frozen = compile_recipe(tmp_path, h, hub, f"hf://{TINY}", "lock=frozen", fetch_only=True)
    assert frozen.returncode == 0, frozen.stderr
    assert frozen.stdout == ok.stdout, "the same blobs"
    assert hub.log[before:] == [], "frozen trusts the lock: no call at all when the blobs are here"

    drift = compile_recipe(tmp_path, h, hub, f"hf://{TINY}@other-branch", "lock=locked")
    assert drift.returncode == 2 and drift.stdout == ""
    assert f"+ hf://{TINY}@other-branch" in drift.stderr and f"- hf://{TINY}@main" in drift.stderr
    assert "lock=auto" in drift.stderr
    assert lock_file.read_bytes() == locked

    frozen_new = compile_recipe(tmp_path, h, hub, f"hf://{TINY}@other-branch", "lock=frozen")
    assert frozen_new.returncode == 2 and "unlocked sources" in frozen_new.stderr


def test_resume_after_a_dropped_connection_and_retry_after_500(tmp_path, hub, tiny_tree):
    path = "unet/diffusion_pytorch_model.safetensors"
    hub.fault(path, "drop", arg=10_000)
    hub.fault("vae/diffusion_pytorch_model.safetensors", "status", arg=500)
    before = len(hub.log)
    proc = compile_recipe(tmp_path, tmp_path / "home", hub, f"hf://{TINY}", fetch_only=True)
    assert proc.returncode == 0, proc.stderr
    unet = [r for r in hub.log[before:] if r.path.endswith(path) and r.method == "GET"]
    assert [r.range for r in unet] == [None, "bytes=10000-"], unet
    assert "resuming at byte 10000" in proc.stderr
    vae = [r for r in hub.log[before:] if r.path.endswith("vae/diffusion_pytorch_model.safetensors")]
    assert len(vae) == 2 and "HTTP 500" in proc.stderr
    blob = tmp_path / "home" / "blobs" / "sha256" / hashlib.sha256(tiny_tree[path]).hexdigest()
    assert blob.read_bytes() == tiny_tree[path]
    assert not list((tmp_path / "home" / "blobs" / "partial").iterdir())


def test_a_partial_download_left_by_a_killed_run_resumes(tmp_path, hub, tiny_tree):
    path = "vae/diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(tiny_tree[path]).hexdigest()
    partial = tmp_path / "home" / "blobs" / "partial" / f"{digest}.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(tiny_tree[path][:5000])  # what a SIGKILLed compile leaves behind
    before = len(hub.log)
    proc = compile_recipe(tmp_path, tmp_path / "home", hub, f"hf://{TINY}", fetch_only=True)
    assert proc.returncode == 0, proc.stderr
    assert [r.range for r in hub.log[before:] if r.path.endswith(path) and r.method == "GET"] == ["bytes=5000-"]
    assert (tmp_path / "home" / "blobs" / "sha256" / digest).read_bytes() == tiny_tree[path]
    assert not partial.exists()


def test_corrupted_bytes_are_refused_and_nothing_is_kept(tmp_path, hub, tiny_tree):
    path = "text_encoder/model.safetensors"
    hub.fault(path, "corrupt", times=10)
    h = tmp_path / "home"
    proc = compile_recipe(tmp_path, h, hub, f"hf://{TINY}", fetch_only=True)
    hub.faults.clear()
    assert proc.returncode == 2, proc.stderr
    expected = hashlib.sha256(tiny_tree[path]).hexdigest()
    assert f"lock pins {expected}" in proc.stderr and "nothing was kept" in proc.stderr
    assert not (h / "blobs" / "sha256" / expected).exists()
    assert not list((h / "blobs" / "partial").glob("*.part"))
    assert not (h / "artifacts" / "v1").exists() or not any((h / "artifacts" / "v1").glob("*/READY"))
    again = compile_recipe(tmp_path, h, hub, f"hf://{TINY}", fetch_only=True)
    assert again.returncode == 0, again.stderr
    assert f"text_encoder/model.safetensors  {h / 'blobs' / 'sha256' / expected}" in again.stdout


def test_a_stalled_server_hits_the_timeout(tmp_path, hub):
    hub.fault("unet/diffusion_pytorch_model.safetensors", "stall", arg=4, times=3)
    t0 = time.monotonic()
    proc = compile_recipe(
        tmp_path,
        tmp_path / "home",
        hub,
        f"hf://{TINY}",
        env={"UIW_HTTP_TIMEOUT": "1", "UIW_HTTP_RETRIES": "1"},
        fetch_only=True,
    )
    hub.faults.clear()
    assert proc.returncode == 2, proc.stderr
    assert "ReadTimeout" in proc.stderr and "after 2 attempts" in proc.stderr
    assert time.monotonic() - t0 < 60


def test_hub_errors_say_what_to_do(tmp_path, hub, tiny_tree):
    h = tmp_path / "home"
    missing = compile_recipe(tmp_path, h, hub, "hf://uiw-test/no-such-repo")
    assert missing.returncode == 2 and "not found" in missing.stderr and "HF_TOKEN" in missing.stderr
    badrev = compile_recipe(tmp_path, h, hub, f"hf://{TINY}@no-such-branch")
    assert badrev.returncode == 2 and "no revision 'no-such-branch'" in badrev.stderr
    nofile = compile_recipe(tmp_path, h, hub, f"hf://{TINY}/nope.safetensors")
    assert nofile.returncode == 2 and "has no file 'nope.safetensors'" in nofile.stderr
    assert "unet/diffusion_pytorch_model.safetensors" in nofile.stderr  # the alternatives
    gated = hub.repo("uiw-test/gated")
    gated.push(tiny_tree)
    gated.gated, gated.token = True, "hf_gated_token_456"
    g = compile_recipe(tmp_path, h, hub, "hf://uiw-test/gated")
    assert g.returncode == 2 and "gated" in g.stderr and f"{hub.url}/uiw-test/gated" in g.stderr
    scheme = compile_recipe(tmp_path, h, hub, "ftp://example.org/m.safetensors")
    assert scheme.returncode == 2 and "unsupported scheme 'ftp'" in scheme.stderr and "hf://ORG/REPO" in scheme.stderr


def test_tokens_reach_the_server_but_never_a_file_or_log(tmp_path, hub, tiny_tree):
    private = hub.repo("uiw-test/private")
    private.push(tiny_tree)
    private.token = "hf_private_token_789"
    h = tmp_path / "home"
    denied = compile_recipe(tmp_path, h, hub, "hf://uiw-test/private")
    assert denied.returncode == 2 and "HF_TOKEN" in denied.stderr
    before = len(hub.log)
    proc = compile_recipe(tmp_path, h, hub, "hf://uiw-test/private", env={"HF_TOKEN": private.token})
    assert proc.returncode == 0, proc.stderr
    # huggingface_hub itself fetches a public registry (/api/agent-harnesses) for its user agent.
    ours = [r for r in hub.log[before:] if "agent-harnesses" not in r.path]
    assert ours and all(r.authorized for r in ours), [r for r in ours if not r.authorized]
    written = [p for root in (h, tmp_path / "recipes") for p in root.rglob("*") if p.is_file()]
    assert written
    for p in written:
        assert private.token.encode() not in p.read_bytes(), p
    assert private.token not in proc.stderr + proc.stdout + denied.stderr


def test_two_recipes_sharing_a_base_download_it_once(tmp_path, hub):
    hub.repo("uiw-test/shared").push(hub.repos[TINY].commits[hub.repos[TINY].refs["main"]])
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name, steps in (("one", 3), ("two", 5)):
        (recipes / f"{name}.yaml").write_text(f"base: hf://uiw-test/shared\ndefaults:\n  steps: {steps}\n")
    env = child_env(tmp_path / "home", {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
    procs = [
        subprocess.Popen(
            [PY, "-m", "compiler", f"recipe={n}", f"recipes_dir={recipes}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in ("one", "two")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] != outs[1][0]
    for path in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        fetched = [r for r in gets(hub, "/uiw-test/shared/resolve/") if r.path.endswith(path)]
        assert len(fetched) == 1, fetched


# --- single-file checkpoints from every scheme -----------------------------------------------

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
