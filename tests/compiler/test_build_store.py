"""The store's shared pieces: one default home, one staging-under-a-lock, and lock names that the
builders and ``gc`` agree on (gc must never take a running build's folder for garbage)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from compiler.store import Store
from compiler.store.converted_bases import ConvertedBaseStore
from compiler.store.gc import sweep
from compiler.store.inventory import Inventory
from compiler.store.layout import default_home
from compiler.store.staging import staged
from runtime.artifact import ARTIFACTS_SUBDIR, DEFAULT_HOME, READY
from tests.conftest import REPO


def test_the_default_home_is_the_one_constant(monkeypatch: pytest.MonkeyPatch):
    """conf/config.yaml spells the default as a YAML literal: a compose without UIW_HOME must land
    where the store commands and the runtime look."""
    from compiler.compose import compose

    monkeypatch.delenv("UIW_HOME", raising=False)
    expected = Path(os.path.expanduser(DEFAULT_HOME))
    assert default_home() == expected
    composed = compose(["recipe=demo", f"recipes_dir={REPO / 'recipes'}"])
    assert composed.home == expected.resolve()
    monkeypatch.setenv("UIW_HOME", "/tmp/elsewhere")
    assert default_home() == Path("/tmp/elsewhere")


def test_staging_clears_what_a_killed_build_left_and_removes_its_own_folder(tmp_path: Path):
    root = tmp_path / "entries"
    (root / ".staging-k1-123-deadbeef").mkdir(parents=True)
    (root / "k1").mkdir()
    (root / "k1" / "half.bin").write_bytes(b"x")  # a final folder without READY: not an entry
    (root / ".staging-k2-9-cafebabe").mkdir()  # another key's build: not ours to remove
    lock = Store(tmp_path).build_lock("k1")
    with staged(root, "k1", lock, lambda: False) as staging:
        assert staging is not None and staging.is_dir() and staging.parent == root
        assert sorted(p.name for p in root.iterdir()) == sorted([staging.name, ".staging-k2-9-cafebabe"])
    assert sorted(p.name for p in root.iterdir()) == [".staging-k2-9-cafebabe"]


def test_staging_yields_nothing_when_the_entry_was_finished_while_waiting(tmp_path: Path):
    """Two builders of one key: the second waits for the lock, then finds the entry and builds nothing."""
    root = tmp_path / "entries"
    store = Store(tmp_path)
    entered = threading.Event()
    release = threading.Event()
    seen: list[Path | None] = []

    def first() -> None:
        with staged(root, "k", store.build_lock("k"), lambda: (root / "k" / READY).is_file()) as staging:
            assert staging is not None
            entered.set()
            release.wait(10)
            (staging / READY).write_text("{}")
            os.replace(staging, root / "k")

    def second() -> None:
        with staged(root, "k", store.build_lock("k"), lambda: (root / "k" / READY).is_file()) as staging:
            seen.append(staging)

    t1 = threading.Thread(target=first)
    t1.start()
    assert entered.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    t2.join(0.3)
    assert t2.is_alive(), "the second builder must wait for the first one's lock"
    release.set()
    t1.join(10)
    t2.join(10)
    assert seen == [None]
    assert (root / "k" / READY).is_file()


def test_gc_leaves_folders_whose_build_or_fill_holds_the_lock(tmp_path: Path):
    """The lock a build holds (Store.building, ConvertedBaseStore.filling) is the one gc asks about."""
    store = Store(tmp_path)
    converted = ConvertedBaseStore(tmp_path)
    with store.building("a" * 64) as staging, converted.filling("b" * 64) as filling:
        assert staging is not None and filling is not None
        doomed = sweep(Inventory.read(tmp_path), []).doomed
        assert staging not in doomed and filling not in doomed
    # Released (a killed build leaves the same folders behind): garbage.
    left = tmp_path / ARTIFACTS_SUBDIR / f".staging-{'a' * 64}-1-00000000"
    left.mkdir()
    unfinished = converted.root / f".staging-{'b' * 64}-1-00000000"
    unfinished.mkdir()
    doomed = sweep(Inventory.read(tmp_path), []).doomed
    assert left in doomed and unfinished in doomed


def test_the_on_disk_names_old_stores_hold(tmp_path: Path):
    """Code names differ from the folders (pickle markers vs converted bases), the folders do not:
    stores written before keep being read and collected."""
    store = Store(tmp_path)
    assert store.pickle_marker("ab") == tmp_path / "blobs" / "converted" / "ab"
    assert store.blob_path("ab") == tmp_path / "blobs" / "sha256" / "ab"
    assert ConvertedBaseStore(tmp_path).path("k") == tmp_path / "converted" / "v1" / "k"
    with store.build_lock("k"):
        assert (tmp_path / "locks" / "k.lock").exists()
