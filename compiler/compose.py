"""The only module that touches Hydra/OmegaConf: command line + conf/ + recipe file -> plain dict.

Precedence: ``conf/`` defaults < the recipe file < command-line overrides. Hydra alone would merge
the recipe *after* config-group choices made on the command line, so the compose is done in
three layers: Hydra composes ``conf/`` with the command line's config-group choices; the recipe
file is merged on top; then the command line's value overrides and its group choices are applied
again so they win. No Hydra output folder or logging setup is created (the compose API does none).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compiler.errors import UserError

# Compiler settings: read here, never part of the Recipe.
SETTINGS = ("recipe", "recipes_dir", "home", "lock")
LOCK_MODES = ("auto", "locked", "frozen", "update")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CLI = "command line"


def _bundled(name: str) -> Path:
    """conf/ and recipes/ at the repo root (checkout, editable install) or inside the installed
    package (wheel, Docker image)."""
    here = Path(__file__).resolve().parent
    repo = here.parent / name
    return repo if repo.is_dir() else here / "_bundled" / name


CONF_DIR = _bundled("conf")
BUNDLED_RECIPES = _bundled("recipes")


@dataclass(frozen=True)
class Composed:
    name: str  # the recipe name
    path: Path  # the recipe file
    fields: dict[str, Any]  # recipe fields, plain data, not yet checked
    recipes_dir: Path
    home: Path
    lock: str  # one of LOCK_MODES


def _groups(conf_dir: Path) -> set[str]:
    return {p.name for p in conf_dir.iterdir() if p.is_dir()}


def compose(argv: list[str], conf_dir: Path = CONF_DIR) -> Composed:
    """Compose the configuration for one compile. Raises UserError."""
    try:
        overrides = OverridesParser.create().parse_overrides(list(argv))
    except HydraException as e:
        raise UserError.one(_CLI, f"cannot parse overrides {argv}: {e}", "write overrides as key=value") from e
    for o in overrides:
        if o.is_sweep_override():
            raise UserError.one(
                f"{_CLI}: {o.input_line}",
                "a sweep (several values) compiles one recipe at a time",
                "give one value, or sweep with `python -m bench -m ...`",
            )
    groups = _groups(conf_dir)
    group_overrides = [o for o in overrides if o.key_or_group in groups and not o.is_delete()]
    value_overrides = [o for o in overrides if o not in group_overrides]

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[str(o.input_line) for o in group_overrides])
    except HydraException as e:
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise UserError.one(_CLI, f"{e}{cause}", f"config groups live in {conf_dir}") from e
    OmegaConf.set_struct(cfg, False)  # the recipe adds keys; the typed Recipe polices them
    chosen = OmegaConf.masked_copy(cfg, [o.key_or_group for o in group_overrides])

    for o in value_overrides:  # settings first: they say which recipe file to read
        if o.key_or_group in SETTINGS:
            _apply(cfg, o)
    name = cfg.get("recipe")
    if OmegaConf.is_missing(cfg, "recipe") or not isinstance(name, str) or not _NAME.match(name):
        raise UserError.one(
            f"{_CLI}: recipe",
            f"expected a recipe name, found {name if not OmegaConf.is_missing(cfg, 'recipe') else 'nothing'}",
            "run `python -m compiler recipe=NAME` to compile recipes/NAME.yaml (letters, digits, _ . -)",
        )
    settings = OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(SETTINGS)), resolve=True)
    assert isinstance(settings, dict)
    recipes_dir = Path(os.path.expanduser(str(settings["recipes_dir"])))
    if str(settings["recipes_dir"]) == "recipes" and not recipes_dir.is_dir():
        recipes_dir = BUNDLED_RECIPES  # an installed copy run outside the checkout
    path = (recipes_dir / f"{name}.yaml").resolve()
    recipe_cfg = _load_recipe(path, recipes_dir)
    lock = str(settings["lock"])
    if lock not in LOCK_MODES:
        raise UserError.one(
            f"{_CLI}: lock",
            f"unknown lock mode {lock!r}",
            "lock=auto (pin what changed), locked (fail on drift), frozen (no metadata calls) or update (re-resolve)",
        )

    for key in recipe_cfg:
        if key in SETTINGS:
            raise UserError.one(
                f"{path}: {key}",
                f"`{key}` is a compiler setting, not a recipe field",
                f"remove it from the recipe; set it on the command line ({key}=...)",
            )
    merged = OmegaConf.merge(cfg, recipe_cfg, chosen)
    assert isinstance(merged, DictConfig)
    for o in value_overrides:
        if o.key_or_group not in SETTINGS:
            _apply(merged, o)
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise UserError.one(str(path), f"cannot resolve an interpolation: {e}", "check ${...} expressions") from e
    assert isinstance(data, dict)
    fields = {str(k): v for k, v in data.items() if k not in SETTINGS}
    return Composed(
        name=name,
        path=path,
        fields=fields,
        recipes_dir=recipes_dir,
        home=Path(os.path.expanduser(str(settings["home"]))).resolve(),
        lock=lock,
    )


def _apply(cfg: DictConfig, o: Any) -> None:
    try:
        if o.is_delete():
            parent, _, leaf = o.key_or_group.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            return
        # Hydra's +key / ++key distinctions do not matter here: the typed Recipe rejects any key
        # it does not know, however it was added.
        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True, force_add=True)
    except OmegaConfBaseException as e:
        raise UserError.one(f"{_CLI}: {o.input_line}", str(e).splitlines()[0], "check the key path") from e


def _load_recipe(path: Path, recipes_dir: Path) -> DictConfig:
    if not path.is_file():
        known = sorted(p.stem for p in recipes_dir.glob("*.yaml")) if recipes_dir.is_dir() else []
        raise UserError.one(
            f"{_CLI}: recipe",
            f"no recipe file {path}",
            f"recipes in {recipes_dir}: {', '.join(known) or 'none'}; or set recipes_dir=DIR (env UIW_RECIPES)",
        )
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OmegaConf's own errors
        raise UserError.one(str(path), f"not valid YAML: {e}", "check indentation and quoting") from e
    if not isinstance(loaded, DictConfig):
        raise UserError.one(
            str(path),
            "expected a mapping of recipe fields at the top level",
            "write `base: builtin:tiny-sd15` and other fields as top-level keys",
        )
    return loaded
