"""Aliases: the store commands (set, rollback, show, their errors), gc keeping what aliases route
to, the worker's view of an alias file that changes, and the weighted choice."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from runtime.aliases import AliasWatch, Route, choose
from runtime.artifact import (
    AliasFile,
    AliasRecord,
    AliasRoute,
    ArtifactError,
    alias_path,
    read_alias,
    write_json_atomic,
)
from tests.conftest import run_compiler
from tests.helpers.pair import A, B, Pair, compiled_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return compiled_pair(tmp_path_factory)


def store(home: Path, *args: str):
    return run_compiler(*args, home=home, module="compiler.store")


def test_set_show_rollback(pair: Pair):
    key_a, key_b = pair.paths[A].name, pair.paths[B].name
    first = store(pair.home, "alias", "set", "styles", A)
    assert first.returncode == 0, first.stderr
    second = store(pair.home, "alias", "set", "styles", f"{A}=0.9", f"{key_b[:12]}=0.1")
    assert second.returncode == 0, second.stderr
    record = read_alias(pair.home, "styles")
    assert record is not None
    # Targets are pinned to their artifacts: a recipe name and a cache key prefix, both resolved.
    assert [(r.target, r.cache_key, r.weight) for r in record.current.routes] == [
        (A, key_a, 0.9),
        (key_b[:12], key_b, 0.1),
    ]
    assert [[r.cache_key for r in h.routes] for h in record.history] == [[key_a]]
    shown = store(pair.home, "alias", "show", "styles")
    assert json.loads(shown.stdout) == record.model_dump(mode="json")
    # Setting the same routes again changes nothing (no history entry).
    again = store(pair.home, "alias", "set", "styles", f"{A}=0.9", f"{key_b[:12]}=0.1")
    assert again.returncode == 0 and read_alias(pair.home, "styles") == record

    back = store(pair.home, "alias", "rollback", "styles")
    assert back.returncode == 0, back.stderr
    rolled = read_alias(pair.home, "styles")
    assert rolled is not None and rolled.current == record.history[0] and rolled.history == ()
    none_left = store(pair.home, "alias", "rollback", "styles")
    assert none_left.returncode == 2 and "no earlier version" in none_left.stderr and "hint:" in none_left.stderr
    # Written atomically: no temp files left beside it.
    assert sorted(p.name for p in alias_path(pair.home, "styles").parent.iterdir() if "styles" in p.name) == [
        "styles.json"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["set", "x1", "no-such-recipe"], "neither a compiled recipe name"),
        (["set", "x2", f"{A}=-1"], "is not a number >= 0"),
        (["set", "x3", f"{A}=heavy"], "is not a number >= 0"),
        (["set", "x4", f"{A}=0"], "every route has weight 0"),
        (["set", "x5", A, A], "same artifact"),
        (["set", "x6", "abcdef"], "neither a compiled recipe name"),  # too short for a key prefix
        (["set", "x7", "0" * 12], "no artifact"),
        (["set", A, B], "already a recipe name"),
        (["set", "bad/name", A], "not a valid alias name"),
        (["rollback", "never-set"], "no such alias"),
        (["show", "never-set"], "no such alias"),
        (["show", "x8", A], "takes only the name"),
    ],
)
def test_alias_errors(pair: Pair, args: list[str], message: str):
    proc = store(pair.home, "alias", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "hint:" in proc.stderr
    assert not alias_path(pair.home, args[1]).exists() or args[1] == "never-set"


def test_gc_keeps_what_only_an_alias_routes_to(pair: Pair, tmp_path: Path):
    """B's artifact, with its recipe name gone, is garbage unless an alias routes to it."""
    key_b = pair.paths[B].name
    for with_alias in (False, True):
        home = tmp_path / f"home-{with_alias}"
        shutil.copytree(pair.home, home, symlinks=True)
        shutil.rmtree(home / "aliases", ignore_errors=True)
        if with_alias:
            assert store(home, "alias", "set", "keep-b", key_b).returncode == 0
        (home / "names" / f"{B}.json").unlink()
        proc = store(home, "gc", "--dry-run", "--recipes", str(tmp_path / "no-recipes"))
        assert proc.returncode == 0, proc.stderr
        assert (key_b in proc.stdout) is not with_alias, proc.stdout
        # an alias in history is kept too: after a rollback away from it
        if with_alias:
            assert store(home, "alias", "set", "keep-b", A).returncode == 0
            proc = store(home, "gc", "--dry-run", "--recipes", str(tmp_path / "no-recipes"))
            assert key_b not in proc.stdout


def test_watch_follows_the_file_without_a_restart(pair: Pair):
    from compiler.store.alias import rollback_alias, set_alias

    set_alias(pair.home, "watched", [A])
    watch = AliasWatch(pair.home, "watched")
    assert [r.cache_key for r in watch.routes()] == [pair.paths[A].name]
    set_alias(pair.home, "watched", [B])  # same second, same size: the new inode tells
    assert [r.cache_key for r in watch.routes()] == [pair.paths[B].name]
    assert watch.routes()[0].path == pair.home / "artifacts" / "v1" / pair.paths[B].name
    rollback_alias(pair.home, "watched")
    assert [r.cache_key for r in watch.routes()] == [pair.paths[A].name]
    alias_path(pair.home, "watched").unlink()
    with pytest.raises(ArtifactError, match=r"is gone.*hint:"):
        watch.routes()


def test_service_selects_through_an_alias(pair: Pair):
    """The worker's selection step: no restart between alias changes, unknown names listed."""
    from compiler.store.alias import set_alias
    from runtime.schema import RequestError
    from runtime.service import Service, Settings

    set_alias(pair.home, "sel", [f"{A}=1", f"{B}=0"])
    svc = Service(Settings(artifacts=("sel", B), home=pair.home, preload="0", routing_seed=1))
    assert list(svc.served) == ["sel", B] and svc.served["sel"].kind == "alias"
    for _ in range(5):
        selection, rest = svc.select({"model": "sel", "prompt": "x"})
        assert selection.reply_field() == {"name": "sel", "recipe": A, "artifact": pair.paths[A].name[:12]}
        assert rest == {"prompt": "x"}
    set_alias(pair.home, "sel", [f"{A}=0", f"{B}=1"])
    assert svc.select({"prompt": "x"})[0].manifest.recipe == B  # the default is the alias
    with pytest.raises(RequestError, match="this worker serves: 'sel', 'fox-ddim'"):
        svc.select({"model": "fox", "prompt": "x"})
    with pytest.raises(RequestError, match="send only 'model'"):
        svc.select({"model": "sel", "recipe": "sel", "prompt": "x"})


def test_alias_named_like_a_recipe_is_refused_at_start(pair: Pair):
    from runtime.service import Service, Settings

    # Written by hand (the command refuses it): a recipe compiled after the alias was set.
    path = alias_path(pair.home, A)
    route = AliasRoute(target=A, cache_key=pair.paths[A].name)
    record = AliasFile(name=A, current=AliasRecord(routes=(route,), set_at="2026-01-01T00:00:00+00:00"))
    write_json_atomic(path, record.model_dump(mode="json"))
    try:
        with pytest.raises(ArtifactError, match=r"both an alias.*and a recipe name.*hint:"):
            Service(Settings(artifacts=(A,), home=pair.home, preload="0"))
    finally:
        path.unlink()


def test_weighted_choice_is_random_by_weight():
    routes = (Route("a", "a", 3.0, Path("a")), Route("b", "b", 1.0, Path("b")), Route("c", "c", 0.0, Path("c")))
    rng = random.Random(1234)
    n = 4000
    counts = Counter(choose(routes, rng).target for _ in range(n))
    assert counts["c"] == 0  # weight 0: never
    # 3:1 -> p(a) = 0.75; sd of the share over 4000 draws is 0.0068: 4.4 sd either side.
    assert abs(counts["a"] / n - 0.75) < 0.03
    one = (Route("a", "a", 1.0, Path("a")), Route("b", "b", 0.0, Path("b")))
    assert {choose(one, rng).target for _ in range(100)} == {"a"}


def test_describe_lists_models_routes_and_artifacts(pair: Pair):
    """In process, nothing loaded: describe answers from the manifests (footprint estimated)."""
    from compiler.store.alias import set_alias
    from runtime.service import Service, Settings

    set_alias(pair.home, "desc", [f"{A}=3", f"{B}=1"])
    svc = Service(Settings(artifacts=(B, "desc"), home=pair.home, preload="0"))
    out = svc.run({"describe": True})
    key_a, key_b = pair.paths[A].name[:12], pair.paths[B].name[:12]
    assert out["models"] == [
        {"name": B, "kind": "recipe", "default": True, "routes": [{"target": B, "weight": 1.0, "artifact": key_b}]},
        {
            "name": "desc",
            "kind": "alias",
            "default": False,
            "routes": [
                {"target": A, "weight": 3.0, "artifact": key_a},
                {"target": B, "weight": 1.0, "artifact": key_b},
            ],
        },
    ]
    assert set(out["artifacts"]) == {key_a, key_b}
    for key, name in ((key_a, A), (key_b, B)):
        art = out["artifacts"][key]
        assert (art["recipe"], art["loaded"], art["load_seconds"]) == (name, False, None)
        assert art["footprint"].startswith("estimated") and art["footprint_bytes"] > 0
        assert art["schema"]["type"] == "object" and "prompt" in art["schema"]["properties"]
    assert out["memory"]["used_bytes"] == 0
    narrowed = svc.run({"describe": True, "model": "desc"})
    assert [m["name"] for m in narrowed["models"]] == ["desc"]
    assert "this worker serves" in svc.run({"describe": True, "model": ["desc"]})["error"]
    assert "nothing else" in svc.run({"describe": True, "prompt": "x"})["error"]
