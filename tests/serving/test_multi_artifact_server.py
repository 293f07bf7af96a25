"""Several models behind one worker, over real HTTP (the RunPod SDK's local dev server): a request
picks its model, a tiny memory budget evicts and reloads with the same pixels, and an alias routes
by weight, follows its file without a restart and rolls back."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from runtime.aliases import Route, choose
from runtime.artifact import read_manifest
from runtime.pool import estimate_bytes
from tests.conftest import decode_image, run_compiler
from tests.helpers.pair import A, B, Pair, compiled_pair, worker

REQ = {"prompt": "a red fox in the snow", "seed": 7, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return compiled_pair(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(pair: Pair) -> dict[str, np.ndarray]:
    """Each artifact's image for REQ from a one-artifact service in this process (no selection,
    no pool pressure): what the worker must reproduce whichever way it chose the artifact."""
    from runtime.service import Service, Settings

    out = {}
    for name, path in pair.paths.items():
        reply = Service(Settings(artifacts=(str(path),), home=pair.home)).run(REQ)
        out[name] = decode_image(reply["images"][0])
    assert not np.array_equal(out[A], out[B]), "the two artifacts must draw different pixels"
    return out


def _key(pair: Pair, name: str) -> str:
    return pair.paths[name].name[:12]


def test_two_artifacts_chosen_per_request(pair: Pair, reference: dict[str, np.ndarray], tmp_path: Path):
    env = {"UIW_ARTIFACTS": f"{A},{B}", "UIW_PRELOAD": "0"}
    with worker(pair.home, env, tmp_path / "worker.log") as w:
        first_a = w.run({**REQ, "model": A})
        first_b = w.run({**REQ, "recipe": B})  # worker-style alias of the field
        default = w.run(REQ)
        again_b = w.run({**REQ, "model": B})
        unknown = w.run({**REQ, "model": "fox-nope"})
        invalid = w.run({**REQ, "model": B, "width": 100})
        described = w.run({"describe": True})
    assert first_a["model"] == {"name": A, "recipe": A, "artifact": _key(pair, A)}
    assert first_b["model"] == {"name": B, "recipe": B, "artifact": _key(pair, B)}
    assert default["model"]["name"] == A  # the first entry is the default
    for reply, name in ((first_a, A), (first_b, B), (default, A), (again_b, B)):
        assert np.array_equal(decode_image(reply["images"][0]), reference[name]), reply["model"]
    # Loaded on demand: the request that caused a load says how long it took; later ones do not.
    assert first_a["load_seconds"] > 0 and first_b["load_seconds"] > 0
    assert "load_seconds" not in default and "load_seconds" not in again_b
    assert unknown.get("failed") and A in unknown["error"] and B in unknown["error"]
    assert invalid.get("failed") and "multiple of 8" in invalid["error"]

    assert [m["name"] for m in described["models"]] == [A, B]
    assert [m["default"] for m in described["models"]] == [True, False]
    for name in (A, B):
        art = described["artifacts"][_key(pair, name)]
        assert art["recipe"] == name and art["family"] == "sd15" and art["loaded"] is True
        assert art["cache_key"] == pair.paths[name].name and art["footprint"] == "measured"
        assert art["load_seconds"] > 0 and art["footprint_bytes"] > 0
        assert isinstance(art["schema"], dict) and art["schema"].get("type") == "object"


def test_eviction_under_a_tiny_budget_reloads_identical_pixels(
    pair: Pair, reference: dict[str, np.ndarray], tmp_path: Path
):
    one = estimate_bytes(read_manifest(pair.paths[A]))
    budget = one * 3 // 2  # room for one artifact, not two
    env = {"UIW_ARTIFACTS": f"{A},{B}", "UIW_PRELOAD": "all", "UIW_MEMORY_BUDGET": str(budget)}
    with worker(pair.home, env, tmp_path / "worker.log") as w:
        at_start = w.run({"describe": True})
        r1 = w.run({**REQ, "model": A})
        r2 = w.run({**REQ, "model": B})
        after_b = w.run({"describe": True})
        r3 = w.run({**REQ, "model": A})
        log = w.log.read_text()

    def loaded(d: dict) -> dict[str, bool]:
        return {n: d["artifacts"][_key(pair, n)]["loaded"] for n in (A, B)}

    # `all` preloads what fits without evicting: the first, not the second.
    assert loaded(at_start) == {A: True, B: False}
    assert "load_seconds" not in r1 and r2["load_seconds"] > 0 and r3["load_seconds"] > 0
    assert loaded(after_b) == {A: False, B: True}
    assert 0 < after_b["memory"]["used_bytes"] <= after_b["memory"]["budget_bytes"] == budget
    assert "evicted" in log
    image1, image3 = decode_image(r1["images"][0]), decode_image(r3["images"][0])
    assert np.array_equal(image1, image3)  # reloaded: the same pixels, bit for bit
    assert np.array_equal(image1, reference[A]) and np.array_equal(decode_image(r2["images"][0]), reference[B])


def test_bigger_than_the_budget_is_a_clear_error(pair: Pair):
    """In process (no HTTP needed to show a reply): the error comes before any load."""
    from runtime.service import Service, Settings

    svc = Service(Settings(artifacts=(A,), home=pair.home, memory_budget=1_000_000, preload="0"))
    reply = svc.run(REQ)
    assert "more than the whole memory budget" in reply["error"] and "hint: raise UIW_MEMORY_BUDGET" in reply["error"]
    assert reply["model"]["name"] == A and not svc.pool.status(svc.manifests.get(pair.paths[A])).loaded


def _alias(pair: Pair, *args: str) -> None:
    proc = run_compiler("alias", *args, home=pair.home, module="compiler.store")
    assert proc.returncode == 0, proc.stderr


def test_alias_routes_by_weight_follows_its_file_and_rolls_back(
    pair: Pair, reference: dict[str, np.ndarray], tmp_path: Path
):
    seed = 5
    _alias(pair, "set", "fox", f"{A}=1", f"{B}=0")
    served: list[str] = []
    with worker(pair.home, {"UIW_ARTIFACTS": "fox", "UIW_ROUTING_SEED": str(seed)}, tmp_path / "w.log") as w:

        def ask() -> str:
            reply = w.run(REQ)
            assert reply["model"]["name"] == "fox", reply
            recipe = reply["model"]["recipe"]
            assert reply["model"]["artifact"] == _key(pair, recipe)
            assert np.array_equal(decode_image(reply["images"][0]), reference[recipe])
            return str(recipe)

        served += [ask() for _ in range(4)]  # weights 1:0: always A
        _alias(pair, "set", "fox", f"{A}=0", f"{B}=1")  # no restart: the next request sees it
        served.append(ask())
        _alias(pair, "rollback", "fox")
        served.append(ask())
        # 1:1, a seeded worker: the worker's choices are the ones choose() makes with that seed
        # (only choices between two live routes draw from the generator).
        _alias(pair, "set", "fox", f"{A}=1", f"{B}=1")
        split = [ask() for _ in range(8)]
    assert served == [A] * 4 + [B, A]
    rng = random.Random(seed)
    routes = (Route(A, "a", 1.0, Path("a")), Route(B, "b", 1.0, Path("b")))
    expected = [choose(routes, rng).target for _ in range(8)]
    assert set(expected) == {A, B}  # this seed sends traffic both ways
    assert split == expected
