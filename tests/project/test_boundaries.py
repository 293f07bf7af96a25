"""Dependency rules: the runtime never imports the compiler, Hydra or OmegaConf; pure compiler
stages import no torch; no compiler module imports one of a higher layer (``LAYERS``)."""

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

from tests.conftest import PY, REPO, child_env

FORBIDDEN_IN_RUNTIME = ("compiler", "hydra", "omegaconf")
PURE = ("compiler/recipe.py", "compiler/uri.py", "compiler/plan.py", "compiler/families.py", "compiler/errors.py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


# The compiler's floors, lowest first; a module may import its own floor and those below, never one
# above (imports inside functions and under TYPE_CHECKING count too). Every module of compiler/ is
# listed: a new one must be given its floor here.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "foundations",
        frozenset(
            {
                "compiler",
                "compiler.errors",
                "compiler.uri",
                "compiler.lockfile",
                "compiler.families",
                "compiler.generic",
                "compiler.family_configs",
                "compiler.tiny_models",
                "compiler.tiny_models_sd",
                "compiler.tiny_models_inpaint",
                "compiler.tiny_models_refiner",
                "compiler.finite",
                "compiler.headers",
            }
        ),
    ),
    (
        "store",
        frozenset(
            {
                "compiler.store",
                "compiler.store.layout",
                "compiler.store.staging",
                "compiler.store.converted_bases",
                "compiler.store.inventory",
                "compiler.store.alias",
                "compiler.store.gc",
            }
        ),
    ),
    (
        "sources",
        frozenset(
            {
                "compiler.sources",
                "compiler.sources.base",
                "compiler.sources.download",
                "compiler.sources.blobs",
                "compiler.sources.builtin",
                "compiler.sources.civitai",
                "compiler.sources.hf",
                "compiler.sources.local",
                "compiler.sources.url",
            }
        ),
    ),
    (
        "reading",
        frozenset(
            {
                "compiler.compose",
                "compiler.recipe",
                "compiler.detect",
                "compiler.validate",
                "compiler.tasks",
                "compiler.pickles",
                "compiler.hypernetworks",
                "compiler.fetch",
            }
        ),
    ),
    ("deciding", frozenset({"compiler.pinning", "compiler.plan", "compiler.refiner"})),
    (
        "making",
        frozenset(
            {
                "compiler.singlefile",
                "compiler.ema",
                "compiler.flux_bfl",
                "compiler.weight_dtypes",
                "compiler.embeddings",
                "compiler.controlnets",
                "compiler.lora",
                "compiler.optimize",
                "compiler.converted_bases",
                "compiler.introspect",
                "compiler.generic_build",
                "compiler.video_limits",
                "compiler.materialize",
                "compiler.refiner_build",
                "compiler.package",
            }
        ),
    ),
    ("build", frozenset({"compiler.build"})),
    ("commands", frozenset({"compiler.cli", "compiler.store_cli", "compiler.__main__", "compiler.store.__main__"})),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` this file imports, by full name: ``from compiler import errors``
    names compiler.errors, ``from compiler.store.layout import X`` compiler.store.layout."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & known


def layer_violations(floors: dict[str, int], files: dict[str, Path]) -> list[str]:
    """``module (floor) imports module (higher floor)`` for every upward import."""
    names = [name for name, _ in LAYERS]
    bad = []
    for module, path in sorted(files.items()):
        if module not in floors:
            continue  # test_every_compiler_module_has_one_floor names it
        for dep in sorted(imported_modules(path, set(floors))):
            if floors[dep] > floors[module]:
                bad.append(f"{module} ({names[floors[module]]}) imports {dep} ({names[floors[dep]]})")
    return bad


def compiler_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / "compiler").rglob("*.py"))}


def test_every_compiler_module_has_one_floor():
    listed = [m for _, group in LAYERS for m in group]
    assert len(listed) == len(set(listed)), "a module is on two floors"
    assert set(listed) == set(compiler_modules()), "give each module of compiler/ its floor in LAYERS"


def test_no_compiler_module_imports_a_higher_layer():
    floors = {m: i for i, (_, group) in enumerate(LAYERS) for m in group}
    assert layer_violations(floors, compiler_modules()) == []


def test_the_layer_check_catches_an_upward_import(tmp_path: Path):
    """The check itself: a storage module that calls the build (the fault this table prevents),
    and a CLI-level import written as ``from compiler import cli``."""
    floors = {m: i for i, (_, group) in enumerate(LAYERS) for m in group}
    store = tmp_path / "store.py"
    store.write_text("def show():\n    from compiler.build import prepare\n    return prepare\n")
    sources = tmp_path / "sources.py"
    sources.write_text("from compiler import cli\n")
    found = layer_violations(floors, {"compiler.store": store, "compiler.sources": sources})
    assert found == [
        "compiler.sources (sources) imports compiler.cli (commands)",
        "compiler.store (store) imports compiler.build (build)",
    ]


def test_storage_and_sources_never_reach_the_build_or_a_command():
    top = {"compiler.build", "compiler.cli", "compiler.store_cli"}
    for module, path in compiler_modules().items():
        package = module.split(".")[:2]
        if package in (["compiler", "store"], ["compiler", "sources"]) and not module.endswith("__main__"):
            assert not imported_modules(path, top), module


def test_runtime_sources_never_import_the_compiler_or_hydra():
    for path in (REPO / "runtime").rglob("*.py"):
        assert not _imports(path) & set(FORBIDDEN_IN_RUNTIME), path


# The artifact contract both sides share: its model and layout, and the integrity checks of its files.
CONTRACT = ("runtime.artifact", "runtime.integrity")


def test_compiler_imports_only_the_artifact_contract_from_the_runtime():
    for path in (REPO / "compiler").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runtime"):
                assert node.module in CONTRACT, f"{path}: imports {node.module}"


def test_only_compose_touches_hydra_and_pure_stages_import_no_torch():
    for path in (REPO / "compiler").rglob("*.py"):
        if path.name != "compose.py":
            assert not _imports(path) & {"hydra", "omegaconf"}, path
    for rel in PURE:
        assert not _imports(REPO / rel) & {"torch", "diffusers", "transformers"}, rel


def test_a_served_request_loads_no_compiler_or_hydra_module(home: Path, demo_artifact: Path):
    code = (
        "import asyncio, json, sys\n"
        "from runtime.handler import handler\n"
        "r = asyncio.run(handler({'input': {'prompt': 'a cat', 'seed': 1}}))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('compiler', 'hydra', 'omegaconf'))\n"
        "print(json.dumps({'ok': 'images' in r, 'bad': bad}))\n"
    )
    env = child_env(home, {"UIW_ARTIFACTS": str(demo_artifact)})
    proc = subprocess.run([PY, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ok": True, "bad": []}
