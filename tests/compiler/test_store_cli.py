"""`python -m compiler.store ls|show|verify|gc` on a real store, as a user runs it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.conftest import run_compiler, run_store

store = run_store


def test_ls_show_verify_gc(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fp32 = run_compiler("recipe=demo", home=home)
    fp16 = run_compiler("recipe=demo", "precision=fp16", home=home)
    assert fp32.returncode == 0 and fp16.returncode == 0, fp32.stderr + fp16.stderr
    k32, k16 = Path(fp32.stdout.strip()).name, Path(fp16.stdout.strip()).name

    check_ls(home, k32, k16)
    check_show(home, k16, built=fp16.stdout.strip())
    check_verify(home, k32)
    check_gc(home, tmp_path / "recipes", orphan=k32, current=k16)


def check_ls(home: Path, k32: str, k16: str) -> None:
    listing = json.loads(store(home, "ls", "--json").stdout)
    assert {a["cache_key"] for a in listing["artifacts"]} == {k32, k16}
    assert listing["names"]["demo"] == {"current": k16, "history": [k32]}
    human = store(home, "ls").stdout
    assert "demo -> " + k16[:16] in human and "(history: 1)" in human


def check_show(home: Path, k16: str, built: str) -> None:
    shown = store(home, "show", "recipe=demo", "precision=fp16")
    assert shown.returncode == 0, shown.stderr
    plan = json.loads(shown.stdout)
    assert plan["cache_key"] == k16 and plan["built"] == built
    assert plan["lock"]["sources"]["builtin:tiny-sd15"]["pin"] == "builtin:tiny-sd15@1"
    assert plan["plan"]["precision"] == "fp16"


def check_verify(home: Path, key: str) -> None:
    """A clean store verifies; one byte more in a file is named with both sizes; the file is put back."""
    assert store(home, "verify").returncode == 0
    victim = home / "artifacts" / "v1" / key / "pipeline" / "model_index.json"
    original = victim.read_bytes()
    victim.write_bytes(original + b" ")
    bad = store(home, "verify")
    size = len(original)
    assert (
        bad.returncode == 1
        and f"artifact {key}: pipeline/model_index.json: {size + 1} bytes, the manifest says {size}" in bad.stdout
    )
    victim.write_bytes(original)


def write_pinning_lockfile(recipes: Path, data: bytes) -> None:
    """A lockfile in `recipes` whose one source pins the blob holding `data`."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    recipes.mkdir()
    source = {
        "source": "https://e.org/m",
        "kind": "file",
        "pin": digest,
        "files": [{"path": "m", "sha256": digest, "size": len(data)}],
    }
    (recipes / "x.lock.json").write_text(json.dumps({"recipe": "x", "sources": {"https://e.org/m": source}}))


def check_gc(home: Path, recipes: Path, orphan: str, current: str) -> None:
    """gc: an artifact no name points at and a blob nothing pins go; a blob a lockfile pins stays.
    Rolling the name's history back to the current artifact alone orphans the other one."""
    name_file = home / "names" / "demo.json"
    name_file.write_text(json.dumps({**json.loads(name_file.read_text()), "history": []}))
    blobs = home / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    loose, pinned = b"nobody wants me", b"a lockfile pins me"
    for data in (loose, pinned):
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    write_pinning_lockfile(recipes, pinned)

    dry = store(home, "gc", "--recipes", str(recipes), "--dry-run")
    assert dry.returncode == 0 and f"would remove {home / 'artifacts' / 'v1' / orphan}" in dry.stdout
    assert (home / "artifacts" / "v1" / orphan).exists()
    gc = store(home, "gc", "--recipes", str(recipes))
    assert gc.returncode == 0, gc.stderr
    assert not (home / "artifacts" / "v1" / orphan).exists()
    assert (home / "artifacts" / "v1" / current).exists()
    assert not (blobs / hashlib.sha256(loose).hexdigest()).exists()
    assert (blobs / hashlib.sha256(pinned).hexdigest()).exists()
