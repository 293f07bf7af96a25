"""What the compiler's command line says to a user's mistakes, word for word: each message is
compared with its committed snapshot (tests/snapshots/cli-*.txt), so a reworded or worse message
shows in review. Run in this process through compiler.cli.main (what `python -m compiler` runs):
every case is refused before any build, so no torch work is done. Paths read as <RECIPES>/<HOME>."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from tests.compiler.test_recipe_hardening import BASE, billion_laughs
from tests.conftest import REPO
from tests.helpers.snapshot import assert_matches_snapshot, normalise

# name -> (recipe text or None for no file, arguments after recipe=r recipes_dir=... home=...)
CASES: dict[str, tuple[str | None, list[str]]] = {
    "unknown-recipe-key": (BASE + "bse_model: x\nprecison: fp16\n", []),
    "unknown-builtin": ("base: builtin:tiny-nope\n", []),
    "unknown-scheduler": (BASE + "scheduler: NOPE\n", []),
    "width-not-a-multiple-of-8": (BASE + "defaults:\n  width: 100\n", []),
    "no-base-nor-checkpoint": ("defaults:\n  steps: 4\n", []),
    "yaml-syntax-error": (BASE + "defaults: [unclosed\n", []),
    "oc-env-in-the-recipe": (BASE + "defaults:\n  negative_prompt: ${oc.env:HOME}\n", []),
    "alias-bomb": (billion_laughs(9), []),
    "recipe-not-found": (None, []),
    "unknown-precision-option": (BASE, ["precision=fp7"]),
    "override-without-a-value": (BASE, ["scheduler"]),
    "override-of-an-unknown-key": (BASE, ["defaults.stepz=4"]),
}


def compile_in_process(args: list[str]) -> tuple[int, str, str]:
    from compiler.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_message_for_each_mistake_is_the_committed_one(tmp_path: Path, case: str):
    recipe, extra = CASES[case]
    recipes, home = tmp_path / "recipes", tmp_path / "home"
    recipes.mkdir()
    if recipe is not None:
        (recipes / "r.yaml").write_text(recipe)
    rc, out, err = compile_in_process(["recipe=r", f"recipes_dir={recipes}", f"home={home}", *extra])
    assert rc == 2 and out == "", err
    # The message is what follows "error: " (log lines above it carry times).
    message = err[err.index("error: ") :]
    assert "Traceback" not in message and "hint" in message, message
    assert_matches_snapshot(f"cli-{case}", normalise(message, {"RECIPES": recipes, "HOME": home, "REPO": REPO}))


def test_no_recipe_named_is_the_committed_message():
    rc, out, err = compile_in_process([])
    assert rc == 2 and out == "", err
    assert_matches_snapshot("cli-no-recipe-named", normalise(err[err.index("error: ") :], {"REPO": REPO}))
