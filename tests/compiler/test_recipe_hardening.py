"""Hostile and mistaken recipes, through the real command line: each is refused with exit 2, an empty
stdout, a where/what/hint message and no traceback, before anything is written to the store."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import compile_text, run_compiler

BASE = "base: builtin:tiny-sd15\n"


def billion_laughs(levels: int) -> str:
    """The classic alias bomb: each level is a list of nine aliases to the level below, so the
    document expands to 9**levels strings (about 387 million for 9 levels) from a few hundred bytes."""
    lines = ['a0: &a0 "lol"']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return BASE + "\n".join(lines) + "\n"


def assert_refused(proc: subprocess.CompletedProcess[str], home: Path, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr and "hint:" in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    assert not home.exists() or not [p for p in home.rglob("*") if p.is_file()], "the store was written to"


SECRET = "s3cr3t-value-from-the-environment"


@pytest.mark.parametrize(
    ("recipe", "args", "where"),
    [
        # A resolver in the recipe file: the compiling machine's environment would land in manifest.json.
        (BASE + "defaults:\n  negative_prompt: ${oc.env:UIW_TEST_SECRET}\n", [], "FILE: defaults.negative_prompt"),
        (BASE + "defaults:\n  negative_prompt: blurry ${oc.env:UIW_TEST_SECRET,x}\n", [], "FILE: defaults"),
        (BASE + "defaults:\n  steps: ${oc.decode:'4'}\n", [], "FILE: defaults.steps"),
        (BASE + "loras:\n  - source: ${oc.env:UIW_TEST_SECRET}\n", [], "FILE: loras.0.source"),
        # A plain reference to another key: refused too (string references nest into a bomb).
        (BASE + "defaults:\n  negative_prompt: ${base}\n", [], "FILE: defaults.negative_prompt"),
        # The same from the command line: it is blamed on the command line.
        (BASE, ["defaults.negative_prompt=${oc.env:UIW_TEST_SECRET}"], "command line: defaults.negative_prompt"),
        (BASE, ["+defaults={negative_prompt: '${oc.env:UIW_TEST_SECRET}'}"], "command line: defaults.negative_prompt"),
    ],
    ids=["oc.env", "oc.env-in-text", "oc.decode", "oc.env-source", "key-reference", "cli-oc.env", "cli-dict-oc.env"],
)
def test_recipes_cannot_read_the_environment(tmp_path: Path, recipe: str, args: list[str], where: str):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "r.yaml").write_text(recipe)
    proc = run_compiler(
        "recipe=r", f"recipes_dir={recipes}", *args, home=tmp_path / "home", env={"UIW_TEST_SECRET": SECRET}
    )
    assert_refused(proc, tmp_path / "home", where.replace("FILE", str(recipes / "r.yaml")), "interpolation")
    assert SECRET not in proc.stderr


def test_project_interpolation_of_settings_still_works(tmp_path: Path):
    """conf/'s own `${oc.env:UIW_HOME,...}` for compiler settings is the project's and keeps working:
    the refusal is for recipe fields only."""
    from compiler.compose import compose

    (tmp_path / "r.yaml").write_text(BASE)
    c = compose(["recipe=r", f"recipes_dir={tmp_path}", f"home=${{oc.env:UIW_TEST_HOME,{tmp_path / 'h'}}}"])
    assert c.home == (tmp_path / "h").resolve()
    assert c.fields["base"] == "builtin:tiny-sd15"


@pytest.mark.timeout(60)  # the base commit spent 86 s and 1.4 GB on 9 levels: never hang CI on it
@pytest.mark.parametrize(
    ("recipe", "fragment"),
    [
        (billion_laughs(9), "expands to more than 10000 YAML nodes"),
        (billion_laughs(5), "expands to more than 10000 YAML nodes"),  # 59,049 strings: still far too many
        (BASE + "x: &x [*x]\n", "an alias refers to a node that contains it"),
        (BASE + "x: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32 levels"),
        (BASE + "x: [" + ", ".join(["1"] * 12_000) + "]\n", "expands to more than 10000 YAML nodes"),
        (BASE + "#" * (70 * 1024) + "\n", "larger than 64 KiB"),
    ],
    ids=["bomb-9-levels", "bomb-5-levels", "recursive-alias", "deep", "many-nodes", "large"],
)
def test_oversized_documents_are_refused_quickly(tmp_path: Path, recipe: str, fragment: str):
    t0 = time.perf_counter()
    proc = compile_text(tmp_path, "bomb", recipe)
    elapsed = time.perf_counter() - t0
    assert_refused(proc, tmp_path / "home", str((tmp_path / "recipes" / "bomb.yaml").resolve()), fragment)
    # ~1 s here, most of it interpreter and Hydra start-up; a guard against expansion, not a benchmark.
    assert elapsed < 10, f"refusing took {elapsed:.1f} s"


@pytest.mark.timeout(30)
def test_the_bound_is_checked_before_composing(tmp_path: Path):
    """In process, without the interpreter's start-up: the bomb is measured, not expanded."""
    from compiler.compose import compose
    from compiler.errors import UserError

    (tmp_path / "bomb.yaml").write_text(billion_laughs(9))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than"):
        compose(["recipe=bomb", f"recipes_dir={tmp_path}"])
    assert time.perf_counter() - t0 < 2  # measured ~0.01 s


def test_anchors_and_aliases_within_the_bound_still_compose(tmp_path: Path):
    """The bound refuses expansion, not YAML features: a recipe sharing one LoRA's settings works."""
    from compiler.compose import compose

    lora = "{source: ./a.safetensors, scale: 0.5}"
    (tmp_path / "r.yaml").write_text(BASE + f"loras:\n  - &shared {lora}\n  - *shared\n")
    fields = compose(["recipe=r", f"recipes_dir={tmp_path}"]).fields
    assert fields["loras"] == [{"source": "./a.safetensors", "scale": 0.5}] * 2


@pytest.mark.parametrize(
    ("recipe", "args", "fragments", "absent"),
    [
        # `base: null` is no base: the recipe needs one, as if the key were missing.
        ("base: null\n", [], ["FILE: base: a recipe needs `base:` or `checkpoint:`"], []),
        # List items name their own keys.
        (
            BASE + "loras:\n  - source: ./a.safetensors\n    scal: 0.5\n",
            [],
            ["FILE: loras.0.scal: unknown key", "valid keys here: source, scale, fuse, name"],
            ["valid keys here: none"],
        ),
        (
            BASE + "embeddings:\n  - source: ./e.safetensors\n    tokn: <cat>\n",
            [],
            ["FILE: embeddings.0.tokn: unknown key", "valid keys here: source, token"],
            ["valid keys here: none"],
        ),
        (
            BASE + "controlnets:\n  - source: ./c.safetensors\n    strength: 1\n",
            [],
            ["FILE: controlnets.0.strength: unknown key", "valid keys here: source, scale, name"],
            ["valid keys here: none"],
        ),
        # A misspelt built-in is an unknown built-in, with the built-ins listed; not a wall of URI forms.
        (
            "base: builtin:tiny-sd1.5\n",
            [],
            ["FILE: base: no built-in model 'tiny-sd1.5'", "did you mean builtin:tiny-sd15?", "builtin:tiny-sdxl"],
            ["unsupported scheme", "civitai://"],
        ),
        (BASE, ["vae=builtin:Tiny-SD15"], ["command line: vae: no built-in model 'Tiny-SD15'"], ["civitai://"]),
        # The value is said once.
        (BASE + "scheduler: EulerA\n", [], ["FILE: scheduler: unknown scheduler 'EulerA'\n"], ["found 'EulerA'"]),
        # Command-line mistakes are the command line's, not the recipe file's.
        (BASE, ["precision=fp64"], ["command line: precision:", "found 'fp64'"], ["FILE"]),
        (BASE, ["defaults.width=6"], ["command line: defaults.width: Input should be a multiple of 8; found 6"], []),
        (BASE, ["+foo=1"], ["command line: foo: unknown key"], ["FILE"]),
        (BASE, ["+loras=[{source: ./a.safetensors, scal: 1}]"], ["command line: loras.0.scal: unknown key"], ["FILE"]),
        (BASE, ["~base"], ["command line: base: a recipe needs"], ["FILE"]),
        # Both at once: each problem where it is.
        (
            BASE + "scheduler: EulerA\n",
            ["defaults.steps=many"],
            ["FILE: scheduler: unknown scheduler", "command line: defaults.steps: Input should be a valid integer"],
            [],
        ),
    ],
    ids=[
        "base-null",
        "lora-keys",
        "embedding-keys",
        "controlnet-keys",
        "builtin-misspelt",
        "cli-builtin-misspelt",
        "scheduler-said-once",
        "cli-precision",
        "cli-width",
        "cli-unknown-key",
        "cli-list-item-key",
        "cli-delete",
        "file-and-cli",
    ],
)
def test_newcomer_mistakes_say_where_and_what(
    tmp_path: Path, recipe: str, args: list[str], fragments: list[str], absent: list[str]
):
    proc = compile_text(tmp_path, "mine", recipe, *args)
    recipe_file = str((tmp_path / "recipes" / "mine.yaml").resolve())
    assert_refused(proc, tmp_path / "home", *(f.replace("FILE", recipe_file) for f in fragments))
    for text in absent:
        assert text.replace("FILE", recipe_file) not in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["a" * 300, "a" * 129])
def test_a_recipe_name_too_long_for_a_file_name(tmp_path: Path, name: str):
    proc = run_compiler(f"recipe={name}", f"recipes_dir={tmp_path}", home=tmp_path / "home")
    assert_refused(proc, tmp_path / "home", "command line: recipe: expected a recipe name", "at most 128 characters")
    assert name not in proc.stderr, "the message shortens what it quotes"


def test_a_128_character_recipe_name_is_accepted(tmp_path: Path):
    """128 characters is a name: it reaches the recipe file (here a missing one, listed as such)."""
    proc = run_compiler(f"recipe={'a' * 128}", f"recipes_dir={tmp_path}", home=tmp_path / "home")
    assert_refused(proc, tmp_path / "home", "no recipe file")
