"""Command line + conf/ + recipe file -> plain dict: the compiler's only Hydra/OmegaConf user (the
bench app, bench/, is a Hydra app of its own).

Precedence: ``conf/`` (``config.yaml``, then the preset picked with ``preset=NAME``) < the recipe
file < command-line values. A preset is a set of defaults for a kind of machine: what the recipe
file sets stays, and a value on the command line (``precision=fp16``) wins over both. So Hydra
composes ``conf/`` with the command line's config-group choices, the recipe file is merged on top,
then the command line's values are applied. No Hydra output folder or logging setup is created
(the compose API does none).

Recipes are data from whoever wrote them, so the recipe file is bounded before it is composed
(bytes, nodes counted with YAML aliases expanded, nesting depth) and recipe fields, from the file
or the command line, may hold no ``${...}`` interpolation: no resolver (``oc.env`` would copy the
compiling machine's environment into the manifest) and no reference to another key (string
interpolations nest into an exponential string as aliases do).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compiler.errors import Problem, UserError

# Compiler settings: read here, never part of the Recipe.
SETTINGS = ("recipe", "recipes_dir", "home", "lock")
LOCK_MODES = ("auto", "locked", "frozen", "update")
# A recipe name is a file name (NAME.yaml, NAME.lock.json, names/NAME.json): at most 128 characters
# keeps every one of them under the 255-byte limit of common file systems.
NAME_MAX = 128
_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX - 1}}}$")
_CLI = "command line"
# Bounds on a recipe file, checked before it is composed. Real recipes are a few hundred bytes and
# under a hundred nodes; the bounds leave room for a hundred LoRAs and refuse a YAML alias bomb
# ("billion laughs": a few hundred bytes that expand to millions of nodes) in milliseconds. The byte
# bound also bounds the composing itself: 64 KiB of the densest YAML (a flat list) composes in
# ~0.1 s with libyaml, ~1 s with PyYAML's pure-Python parser.
MAX_RECIPE_BYTES = 64 * 1024
MAX_RECIPE_NODES = 10_000  # scalars, sequences and mappings, each alias counted as what it expands to
MAX_RECIPE_DEPTH = 32


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
    # Recipe field paths (dotted) that command-line overrides set or deleted: problems with them
    # are the command line's, not the recipe file's.
    command_line: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Settings:
    """The compiler settings of one compose, checked."""

    name: str
    recipes_dir: Path
    home: Path
    lock: str


def compose(argv: list[str], conf_dir: Path = CONF_DIR) -> Composed:
    """Compose the configuration for one compile. Raises UserError."""
    overrides = _parse_overrides(argv)
    groups = _groups(conf_dir)
    group_overrides = [o for o in overrides if o.key_or_group in groups and not o.is_delete()]
    value_overrides = [o for o in overrides if o not in group_overrides]
    cfg = _compose_conf(conf_dir, group_overrides)
    for o in value_overrides:  # settings first: they say which recipe file to read
        if o.key_or_group in SETTINGS:
            _apply(cfg, o)
    settings = _settings(cfg)
    path = (settings.recipes_dir / f"{settings.name}.yaml").resolve()
    recipe_cfg = _load_recipe(path, settings.recipes_dir)
    field_overrides = [o for o in value_overrides if o.key_or_group not in SETTINGS]
    _check_recipe_keys(recipe_cfg, path, field_overrides)
    merged = OmegaConf.merge(cfg, recipe_cfg)
    assert isinstance(merged, DictConfig)
    for o in field_overrides:
        _apply(merged, o)
    return Composed(
        name=settings.name,
        path=path,
        fields=_plain_fields(merged, conf_dir),
        recipes_dir=settings.recipes_dir,
        home=settings.home,
        lock=settings.lock,
        command_line=tuple(str(o.key_or_group) for o in field_overrides),
    )


def _parse_overrides(argv: list[str]) -> list[Override]:
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
    return overrides


def _groups(conf_dir: Path) -> set[str]:
    return {p.name for p in conf_dir.iterdir() if p.is_dir()}


def _group_choices(conf_dir: Path, group_overrides: list[Override]) -> list[str]:
    """Hydra overrides for the command line's config-group choices, each option checked.

    ``config.yaml`` lists every group with no choice (``preset: null``), so Hydra takes
    ``preset=NAME``; the ``+preset=NAME`` that Hydra users also write means the same here, and
    ``preset=null`` is no choice."""
    choices = []
    for o in group_overrides:
        group, value = str(o.key_or_group), o.value()
        if value is None:
            continue
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        if not isinstance(value, str) or value not in options:
            raise UserError.one(
                f"{_CLI}: {group}",
                f"no {group} named {_clip(str(value))}",
                f"{group}=NAME, NAME one of {', '.join(options)} (the files in {conf_dir / group})",
            )
        choices.append(f"{group}={value}")
    return choices


def _compose_conf(conf_dir: Path, group_overrides: list[Override]) -> DictConfig:
    """conf/config.yaml with the chosen group options, open to the recipe's keys."""
    choices = _group_choices(conf_dir, group_overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=choices)
    except HydraException as e:
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise UserError.one(_CLI, f"{e}{cause}", f"config groups live in {conf_dir}") from e
    OmegaConf.set_struct(cfg, False)  # the recipe adds keys; the typed Recipe polices them
    return cfg


def _settings(cfg: DictConfig) -> _Settings:
    """The compiler settings, after the command line's: recipe name, where recipes and the store
    are, and the lock mode."""
    name = cfg.get("recipe")
    if OmegaConf.is_missing(cfg, "recipe") or not isinstance(name, str) or not _NAME.match(name):
        found = "nothing" if OmegaConf.is_missing(cfg, "recipe") else _clip(str(name))
        raise UserError.one(
            f"{_CLI}: recipe",
            f"expected a recipe name, found {found}",
            f"run `python -m compiler recipe=NAME` to compile recipes/NAME.yaml (letters, digits, _ . -; "
            f"at most {NAME_MAX} characters)",
        )
    settings = OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(SETTINGS)), resolve=True)
    assert isinstance(settings, dict)
    recipes_dir = Path(os.path.expanduser(str(settings["recipes_dir"])))
    if str(settings["recipes_dir"]) == "recipes" and not recipes_dir.is_dir():
        recipes_dir = BUNDLED_RECIPES  # an installed copy run outside the checkout
    lock = str(settings["lock"])
    if lock not in LOCK_MODES:
        raise UserError.one(
            f"{_CLI}: lock",
            f"unknown lock mode {lock!r}",
            "lock=auto (pin what changed), locked (fail on drift), frozen (no metadata calls) or update (re-resolve)",
        )
    home = Path(os.path.expanduser(str(settings["home"]))).resolve()
    return _Settings(name=name, recipes_dir=recipes_dir, home=home, lock=lock)


def _check_recipe_keys(recipe_cfg: DictConfig, path: Path, field_overrides: list[Override]) -> None:
    """No compiler setting in the recipe file, and no ``${...}`` in recipe fields from the file or
    the command line (every one reported)."""
    for key in recipe_cfg:
        if key in SETTINGS:
            raise UserError.one(
                f"{path}: {key}",
                f"`{key}` is a compiler setting, not a recipe field",
                f"remove it from the recipe; set it on the command line ({key}=...)",
            )
    interpolations = [
        Problem(f"{path}: {key}", what, _NO_INTERPOLATION)
        for key, what in _interpolations(OmegaConf.to_container(recipe_cfg, resolve=False))
    ]
    for o in field_overrides:
        interpolations.extend(
            Problem(f"{_CLI}: {o.key_or_group}{'.' + key if key else ''}", what, _NO_INTERPOLATION)
            for key, what in _interpolations(o.value())
        )
    if interpolations:
        raise UserError(interpolations)


def _plain_fields(merged: DictConfig, conf_dir: Path) -> dict[str, Any]:
    """The recipe fields as plain data, settings left out."""
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        # Only conf/ may still hold interpolations here: the project's, not the user's.
        raise UserError.one(str(conf_dir), f"cannot resolve an interpolation: {e}", "check conf/'s ${...}") from e
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items() if k not in SETTINGS}


_NO_INTERPOLATION = (
    "write the value itself: recipes are data, so `${...}` (resolvers such as oc.env, and references "
    "to other keys) is not resolved in recipe fields"
)


def _clip(text: str, limit: int = 80) -> str:
    """A user's value, shortened for a message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _interpolations(value: Any, at: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, what) for each string under ``value`` that OmegaConf would read as an
    interpolation: any ``${``, escaped or not (an escaped one resolves too, to its literal)."""
    if isinstance(value, str):
        if "${" in value:
            yield at, f"found the interpolation {_clip(value)}"
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _interpolations(v, f"{at}.{k}" if at else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _interpolations(v, f"{at}.{i}" if at else str(i))


def _apply(cfg: DictConfig, o: Override) -> None:
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
    try:
        if not path.is_file():
            known = sorted(p.stem for p in recipes_dir.glob("*.yaml")) if recipes_dir.is_dir() else []
            raise UserError.one(
                f"{_CLI}: recipe",
                f"no recipe file {path}",
                f"recipes in {recipes_dir}: {', '.join(known) or 'none'}; or set recipes_dir=DIR (env UIW_RECIPES)",
            )
        with path.open("rb") as f:  # one byte past the bound tells "too large" without reading it all
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:  # a name too long for the file system, a folder without read permission
        raise UserError.one(
            f"{_CLI}: recipe", f"cannot read {path}: {e.strerror}", "check the recipe name and recipes_dir"
        ) from e
    if len(raw) > MAX_RECIPE_BYTES:
        raise UserError.one(
            str(path),
            f"the recipe file is larger than {MAX_RECIPE_BYTES // 1024} KiB",
            "a recipe names its models, it does not hold them: point `source:` fields at files",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError.one(str(path), f"not UTF-8 text: {e}", "save the recipe as UTF-8") from e
    _check_size(text, path)
    try:
        loaded = OmegaConf.load(io.StringIO(text))
    except Exception as e:  # yaml.YAMLError and OmegaConf's own errors
        raise UserError.one(str(path), f"not valid YAML: {e}", "check indentation and quoting") from e
    if not isinstance(loaded, DictConfig):
        raise UserError.one(
            str(path),
            "expected a mapping of recipe fields at the top level",
            "write `base: builtin:tiny-sd15` and other fields as top-level keys",
        )
    return loaded


def _check_size(text: str, path: Path) -> None:
    """Refuse a document whose nodes, with every alias expanded, are too many or nest too deep."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML was built with it
    try:
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as e:
        raise UserError.one(str(path), f"not valid YAML: {e}", "check indentation and quoting") from e
    except RecursionError as e:  # PyYAML's pure-Python composer recurses once per level
        raise _too_deep(path) from e
    if root is not None:
        _Expansion(path).measure(root, 0)


def _too_deep(path: Path) -> UserError:
    return UserError.one(str(path), f"nested deeper than {MAX_RECIPE_DEPTH} levels", "a recipe is a few levels deep")


class _Expansion:
    """The size of a YAML node graph with its aliases expanded, measured without expanding them.

    PyYAML's composer builds the node graph without expanding aliases (an alias is the anchored
    node itself), so composing is linear in the file's size; the walk below visits that graph once,
    remembering each node's expanded size, so a bomb is measured without being expanded. OmegaConf
    would expand it, copying every alias into its own node."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded node count, height)
        self.open: set[int] = set()  # the nodes being measured: one met again is its own ancestor

    def measure(self, node: yaml.Node, depth: int) -> tuple[int, int]:
        """(expanded node count, height) of ``node`` found ``depth`` levels down; raises UserError
        past a bound."""
        if depth > MAX_RECIPE_DEPTH:  # before descending: the walk's own recursion stays bounded
            raise _too_deep(self.path)
        key = id(node)
        if key in self.open:
            raise UserError.one(
                str(self.path),
                "an alias refers to a node that contains it (a recursive structure)",
                "remove the alias",
            )
        if key not in self.done:
            self.open.add(key)
            self.done[key] = self._expanded(node, depth)
            self.open.discard(key)
        count, height = self.done[key]
        if count > MAX_RECIPE_NODES:
            raise UserError.one(
                str(self.path),
                f"the document expands to more than {MAX_RECIPE_NODES} YAML nodes (aliases counted as what "
                "they repeat)",
                "write the recipe out plainly; anchors and aliases (&name, *name) that repeat large parts are refused",
            )
        if depth + height > MAX_RECIPE_DEPTH:  # an alias to a deep node, placed deep
            raise _too_deep(self.path)
        return count, height

    def _expanded(self, node: yaml.Node, depth: int) -> tuple[int, int]:
        """(count, height) of a node not measured yet, from its children's."""
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        count, height = 1, 0
        for child in children:
            c, h = self.measure(child, depth + 1)
            count, height = count + c, max(height, h + 1)
            if count > MAX_RECIPE_NODES:
                break  # refused by the caller: no need to measure the rest
        return count, height
