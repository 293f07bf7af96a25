"""`store ls` tells a recipe's artifacts apart; `gc --keep-history N` frees what only old history
held, keeping the current artifacts, the N newest of each name's history and whatever aliases
route to."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, run_store

# demo as the session compiled it (fp32, K_EULER), then three rebuilds: the name's history is then
# [fp16+DDIM (current), fp16, DDIM, fp32 K_EULER]
BUILDS = ([], ["scheduler=DDIM"], ["precision=fp16"], ["precision=fp16", "scheduler=DDIM"])


def store_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_store(home, *args, timeout=120)


@pytest.fixture(scope="module")
def four(demo_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A store with four artifacts of the demo recipe (BUILDS, in order) and their cache keys.
    Built in this process (torch is imported here already: half a second each)."""
    import contextlib
    import io

    from compiler.cli import main
    from runtime.artifact import ARTIFACTS_SUBDIR

    store = tmp_path_factory.mktemp("four") / "home"
    # The session's artifact, without its name file (other tests may have moved that name on):
    # the first build is a cache hit and names it.
    shutil.copytree(demo_artifact, store / ARTIFACTS_SUBDIR / demo_artifact.name)
    keys = []
    for extra in BUILDS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["recipe=demo", f"home={store}", f"recipes_dir={REPO / 'recipes'}", *extra])
        assert rc == 0
        keys.append(Path(out.getvalue().strip()).name)
    assert len(set(keys)) == 4 and keys[0] == demo_artifact.name
    return store, keys


def test_ls_shows_what_differs_between_artifacts_of_one_recipe(four: tuple[Path, list[str]]):
    store, (k_euler, ddim, fp16, fp16_ddim) = four
    listing = store_cli(store, "ls")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()

    def row(key: str) -> tuple[str, str]:
        """An artifact's line and the line after it (its differences)."""
        i = next(i for i, line in enumerate(lines) if line.strip().startswith(key[:16]))
        return lines[i], lines[i + 1]

    line, differs = row(k_euler)
    assert " K_EULER " in line and " fp32 " in line and "demo~3" in line
    assert differs.strip().startswith("differs:") and "scheduler=K_EULER" in differs and "precision=fp32" in differs
    line, differs = row(ddim)
    assert " DDIM " in line and "demo~2" in line and "scheduler=DDIM" in differs and "precision=fp32" in differs
    line, differs = row(fp16_ddim)
    assert " DDIM " in line and " fp16 " in line and line.rstrip().endswith(" demo")
    assert "scheduler=DDIM" in differs and "precision=fp16" in differs
    # Nothing but what the builds changed is called a difference.
    data = {a["cache_key"]: a for a in json.loads(store_cli(store, "ls", "--json").stdout)["artifacts"]}
    assert data[fp16]["differs"] == {"precision": "fp16", "scheduler": "K_EULER"}
    assert data[fp16]["history_of"] == ["demo~1"] and data[fp16_ddim]["names"] == ["demo"]


def test_gc_keep_history_frees_old_history_and_keeps_current_and_aliased(four: tuple[Path, list[str]], tmp_path: Path):
    from runtime.artifact import ARTIFACTS_SUBDIR, read_name
    from runtime.integrity import VERIFIED_DIR

    store = tmp_path / "home"
    shutil.copytree(four[0], store)
    k_euler, ddim, fp16, fp16_ddim = four[1]
    arts = store / ARTIFACTS_SUBDIR
    # A memo per artifact (the copies' inodes are new), as a load or a cache hit writes them.
    assert store_cli(store, "verify").returncode == 0
    alias = store_cli(store, "alias", "set", "stable", k_euler)
    assert alias.returncode == 0, alias.stderr
    (store / "damaged" / f"{ddim}-20250101T000000Z").mkdir(parents=True)  # set aside by a compile

    assert store_cli(store, "gc", "--keep-history", "-1").returncode == 2
    dry = store_cli(store, "gc", "--keep-history", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would trim names/demo.json history to 1: {ddim[:16]}, {k_euler[:16]}" in dry.stdout
    assert f"would remove {arts / ddim} " in dry.stdout and f"would remove {arts / k_euler} " not in dry.stdout
    assert (arts / ddim).is_dir() and len(read_name(store, "demo").history) == 3  # type: ignore[union-attr]

    gc = store_cli(store, "gc", "--keep-history", "1")
    assert gc.returncode == 0, gc.stderr
    assert not (arts / ddim).exists() and not (arts / VERIFIED_DIR / f"{ddim}.json").exists()
    for kept in (fp16_ddim, fp16, k_euler):  # current, history 1, what the alias routes to
        assert (arts / kept / "READY").is_file() and (arts / VERIFIED_DIR / f"{kept}.json").is_file()
    assert not (store / "damaged").exists()
    name = read_name(store, "demo")
    assert name is not None and name.current.cache_key == fp16_ddim
    assert [h.cache_key for h in name.history] == [fp16]
    assert store_cli(store, "verify").returncode == 0
    assert store_cli(store, "alias", "show", "stable").returncode == 0
