"""Every shipped configuration in conf/ composed: config.yaml alone and each preset of conf/preset/,
with the recipe fields it sets, and the precedence conf/ < preset < recipe file < command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compiler.compose import CONF_DIR, compose
from compiler.errors import UserError
from compiler.recipe import parse_recipe
from tests.conftest import REPO, run_compiler

BASE = "base: builtin:tiny-sd15\n"

# What each preset sets, written out here rather than read from conf/: the reference the files
# are checked against.
PRESETS = {
    "fast-gpu": {"precision": "fp16", "compile": {"scope": "regional"}, "channels_last": True},
    "low-vram": {"precision": "fp16", "offload": "model"},
}


def fields(tmp_path: Path, recipe: str, *args: str) -> dict:
    (tmp_path / "r.yaml").write_text(recipe)
    return compose(["recipe=r", f"recipes_dir={tmp_path}", *args]).fields


def test_the_shipped_groups_and_options_are_the_tested_ones():
    assert {p.name for p in CONF_DIR.iterdir() if p.is_dir()} == {"preset"}
    assert {p.stem for p in (CONF_DIR / "preset").glob("*.yaml")} == set(PRESETS)


def test_config_yaml_alone_sets_fp32(tmp_path: Path):
    assert fields(tmp_path, BASE) == {"base": "builtin:tiny-sd15", "precision": "fp32"}
    assert fields(tmp_path, BASE, "preset=null") == {"base": "builtin:tiny-sd15", "precision": "fp32"}


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("spelling", ["preset={}", "+preset={}"])
def test_each_preset_sets_its_fields(tmp_path: Path, name: str, spelling: str):
    got = fields(tmp_path, BASE, spelling.format(name))
    assert got == {"base": "builtin:tiny-sd15", **PRESETS[name]}
    # The typed Recipe takes them, and reads them as it reads the same fields written in a recipe.
    by_preset = parse_recipe("r", tmp_path / "r.yaml", got)
    explicit = fields(tmp_path, BASE + yaml.safe_dump(PRESETS[name]))
    assert by_preset == parse_recipe("r", tmp_path / "r.yaml", explicit)
    assert by_preset.precision == PRESETS[name]["precision"]


def test_the_recipe_file_wins_over_the_preset(tmp_path: Path):
    """A preset is defaults for a kind of machine: a Flux recipe's bf16 stays bf16 under fast-gpu.
    A compile mapping in the recipe merges with the preset's (the recipe's keys win)."""
    recipe = BASE + "precision: bf16\nchannels_last: false\ncompile: {mode: max-autotune}\n"
    got = fields(tmp_path, recipe, "preset=fast-gpu")
    assert got == {
        "base": "builtin:tiny-sd15",
        "precision": "bf16",
        "channels_last": False,
        "compile": {"scope": "regional", "mode": "max-autotune"},
    }
    assert fields(tmp_path, BASE + "offload: sequential\n", "preset=low-vram")["offload"] == "sequential"


def test_command_line_values_win_over_preset_and_recipe(tmp_path: Path):
    recipe = BASE + "precision: bf16\n"
    (tmp_path / "r.yaml").write_text(recipe)
    c = compose(["recipe=r", f"recipes_dir={tmp_path}", "preset=fast-gpu", "precision=fp32", "compile=off"])
    assert c.fields == {"base": "builtin:tiny-sd15", "precision": "fp32", "compile": "off", "channels_last": True}
    assert c.command_line == ("precision", "compile")  # problems with these are the command line's
    # `precision=fp16` without a preset stays a plain value: it beats the recipe's bf16 as before.
    assert fields(tmp_path, recipe, "precision=fp16")["precision"] == "fp16"
    got = fields(tmp_path, BASE, "preset=low-vram", "offload=none", "compile.scope=full")
    assert (got["offload"], got["compile"]) == ("none", {"scope": "full"})


@pytest.mark.parametrize("value", ["nope", "1", "[fast-gpu,low-vram]"])
def test_an_unknown_preset_names_the_known_ones(tmp_path: Path, value: str):
    with pytest.raises(UserError) as e:
        fields(tmp_path, BASE, f"preset={value}")
    (p,) = e.value.problems
    assert p.where == "command line: preset"
    assert p.what.startswith("no preset named")
    assert "fast-gpu, low-vram" in p.hint


def test_the_hardening_still_holds_under_a_preset(tmp_path: Path):
    """A preset is conf/, but the recipe fields beside it are still refused an interpolation."""
    with pytest.raises(UserError, match="interpolation"):
        fields(tmp_path, BASE + "scheduler: ${oc.env:HOME}\n", "preset=fast-gpu")
    with pytest.raises(UserError, match="command line: precision"):
        fields(tmp_path, BASE, "preset=fast-gpu", "precision=${oc.env:HOME}")


def test_a_preset_through_the_real_cli(tmp_path: Path):
    """`python -m compiler.store show recipe=demo preset=fast-gpu` plans the build the same fields
    on the command line plan: the demo recipe's own fp32 kept, the preset's compile and layout added."""

    def cache_key(*args: str) -> str:
        proc = run_compiler("show", "recipe=demo", *args, home=tmp_path / "home", module="compiler.store")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["cache_key"]

    assert "precision: fp32" in (REPO / "recipes" / "demo.yaml").read_text()
    # Two compiler start-ups (~3 s of CPU each); that these overrides change the plan is
    # test_perf_options' business.
    assert cache_key("preset=fast-gpu") == cache_key("compile.scope=regional", "channels_last=true")


def test_a_recipe_file_cannot_pick_a_preset(tmp_path: Path):
    """Presets are command-line choices: in a recipe file `preset:` is an unknown recipe field."""
    got = fields(tmp_path, BASE + "preset: fast-gpu\n")
    assert got["precision"] == "fp32"
    with pytest.raises(UserError, match="preset: unknown key"):
        parse_recipe("r", tmp_path / "r.yaml", got)
