"""A damaged artifact is never served nor reported as a cache hit: the runtime checks the files it
loads against the manifest (stat first, then sha256 in a thread beside the load, minus what the
verification memo vouches for), and the compiler's cache hit finds the damage, sets the artifact
aside and builds it again."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, REQ, decode_image


def private_store(demo_artifact: Path, dst: Path) -> Path:
    """A store of its own holding a copy of the session's demo artifact (so damaging it touches
    nothing another test reads); returns the copied artifact."""
    from runtime.artifact import ARTIFACTS_SUBDIR

    artifact = dst / ARTIFACTS_SUBDIR / demo_artifact.name
    shutil.copytree(demo_artifact, artifact)
    return artifact


def largest_weight(artifact: Path) -> Path:
    from runtime.fastload import weight_files

    return weight_files(artifact / "pipeline")[0]


def flip_byte(path: Path) -> None:
    """One bit of one byte in the middle of the tensor data (the header stays readable), then the
    mtime set back to what it was: only ctime shows that the file was written."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 4096)


def compile_demo(store: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``python -m compiler recipe=demo`` against the store, in this process (torch is imported
    already here: the rebuild takes a second instead of a child's twenty)."""
    from compiler.cli import main

    capsys.readouterr()
    rc = main(["recipe=demo", f"home={store}", f"recipes_dir={REPO / 'recipes'}"])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped-byte", "truncated"])
def test_damaged_weights_are_refused_by_the_runtime_and_rebuilt_by_the_compiler(
    damage, demo_artifact: Path, demo_image: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from runtime.artifact import read_manifest
    from runtime.integrity import verify_files
    from runtime.service import Service, Settings

    store = tmp_path / "home"
    artifact = private_store(demo_artifact, store)
    victim = largest_weight(artifact)
    rel = victim.relative_to(artifact).as_posix()
    expected = next(f for f in read_manifest(artifact).files if f.path == rel)
    damage(victim)

    reply = Service(Settings(artifacts=(str(artifact),), home=store)).run(REQ)
    assert "images" not in reply and "damaged artifact" in reply["error"], reply
    assert rel in reply["error"] and "recompile" in reply["error"]
    if damage is flip_byte:  # the expected and the found hash, as `sha256sum` would print them
        found = hashlib.sha256(victim.read_bytes()).hexdigest()
        assert f"sha256 {found}, the manifest says {expected.sha256}" in reply["error"]
    else:
        assert f"{expected.size - 4096} bytes, the manifest says {expected.size}" in reply["error"]

    rc, out = compile_demo(store, capsys)
    assert rc == 0 and out == f"{artifact}\n"  # the same cache key, built again
    assert verify_files(artifact, read_manifest(artifact)) == []
    (aside,) = (store / "damaged").iterdir()  # kept to look at, without READY: no artifact
    assert not (aside / "READY").exists() and rel in (aside / "PROBLEMS.txt").read_text()

    rebuilt = Service(Settings(artifacts=(str(artifact),), home=store)).run(REQ)
    assert "images" in rebuilt, rebuilt
    np.testing.assert_array_equal(decode_image(rebuilt["images"][0]), demo_image)


def test_a_cache_hit_on_a_damaged_artifact_never_prints_its_path(
    demo_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Damage the compiler can see from a stat alone (a config file grown by a byte) and damage it
    must hash to see (a flipped byte): either way the printed artifact verifies."""
    from runtime.artifact import read_manifest
    from runtime.integrity import verify_files

    store = tmp_path / "home"
    artifact = private_store(demo_artifact, store)
    rc, out = compile_demo(store, capsys)
    assert (rc, out) == (0, f"{artifact}\n")  # an intact copy: a hit (hashed once: the copy is new)
    config = artifact / "pipeline" / "unet" / "config.json"
    config.write_text(config.read_text() + " ")
    flip_byte(largest_weight(artifact))
    rc, out = compile_demo(store, capsys)
    assert (rc, out) == (0, f"{artifact}\n")
    assert verify_files(artifact, read_manifest(artifact)) == []


def test_the_memo_vouches_only_for_files_unchanged_since_they_hashed_right(demo_artifact: Path, tmp_path: Path):
    from runtime.artifact import read_manifest
    from runtime.integrity import check_artifact, memo_path, stat_files, unverified

    artifact = tmp_path / "artifacts" / "v1" / demo_artifact.name
    shutil.copytree(demo_artifact, artifact)
    m = read_manifest(artifact)
    every = [f.path for f in m.files]

    def pending(mode: str = "memo") -> list[str]:
        return [e.path for e in unverified(artifact, m, stat_files(artifact, m)[0], mode)]  # type: ignore[arg-type]

    assert pending() == every  # a copy: new inodes, no memo
    assert check_artifact(artifact, m) == [] and memo_path(artifact).is_file()
    assert pending() == [] and pending("full") == every and pending("off") == []
    touched = artifact / m.files[0].path
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1))
    assert pending() == [m.files[0].path]


def test_full_verification_catches_what_the_memo_cannot_see(demo_artifact: Path, tmp_path: Path):
    """Bytes that change below the filesystem (bit rot) leave the stat as it was: simulated here
    by recording the damaged file's stat in the memo. The memo then vouches for it; UIW_VERIFY=full
    and `store verify` hash regardless."""
    from runtime.artifact import read_manifest
    from runtime.integrity import check_artifact, remember_verified, stat_files, verify_files

    artifact = tmp_path / "artifacts" / "v1" / demo_artifact.name
    shutil.copytree(demo_artifact, artifact)
    m = read_manifest(artifact)
    victim = largest_weight(artifact)
    flip_byte(victim)
    remember_verified(artifact, m, stat_files(artifact, m)[0])
    rel = victim.relative_to(artifact).as_posix()
    assert check_artifact(artifact, m, "memo") == []
    (problem,) = check_artifact(artifact, m, "full")
    assert problem.startswith(f"{rel}: sha256 ")
    assert verify_files(artifact, m) == [problem]


def test_the_verifier_names_the_damage_even_when_the_load_failed_on_it(demo_artifact: Path, tmp_path: Path):
    from runtime.artifact import read_manifest
    from runtime.fastload import Verifier
    from runtime.integrity import IntegrityError

    artifact = tmp_path / "artifact"
    shutil.copytree(demo_artifact, artifact)
    m = read_manifest(artifact)
    victim = largest_weight(artifact)
    flip_byte(victim)
    with pytest.raises(IntegrityError, match=victim.name) as caught, Verifier(artifact, m, list(m.files)):
        raise ValueError("safetensors could not read it")
    assert isinstance(caught.value.__cause__, ValueError)
    with Verifier(artifact, m, [f for f in m.files if f.path != victim.relative_to(artifact).as_posix()]):
        pass  # the other files are intact


def test_uiw_verify_rejects_an_unknown_mode(monkeypatch: pytest.MonkeyPatch):
    from runtime.settings import SettingError, verify_mode

    monkeypatch.setenv("UIW_VERIFY", "paranoid")
    with pytest.raises(SettingError, match="UIW_VERIFY: 'paranoid' is not one of memo, full, off"):
        verify_mode()
    monkeypatch.setenv("UIW_VERIFY", "full")
    assert verify_mode() == "full"
