"""Sources, lockfile and store against loopback servers that speak the Hub and CivitAI APIs.

The compiler runs as users run it (a subprocess, `python -m compiler recipe=…`), with the real
huggingface_hub client pointed at the fake Hub through HF_ENDPOINT and the CivitAI client through
CIVITAI_BASE_URL. Faults are injected on the server; what the server saw proves resume and dedup.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from tests.compiler.conftest import TINY
from tests.conftest import DEMO_SETTINGS, PY, REPO, REQ, child_env, run_compiler, serve
from tests.helpers.fakehub import FakeHub

RECIPE = "base: {base}\n" + DEMO_SETTINGS


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
