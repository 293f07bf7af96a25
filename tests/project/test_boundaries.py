"""Dependency rules: the runtime never imports the compiler, Hydra or OmegaConf; pure compiler
stages import no torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

from tests.conftest import PY, REPO

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


def test_runtime_sources_never_import_the_compiler_or_hydra():
    for path in (REPO / "runtime").rglob("*.py"):
        assert not _imports(path) & set(FORBIDDEN_IN_RUNTIME), path


def test_compiler_imports_only_runtime_artifact_from_the_runtime():
    for path in (REPO / "compiler").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runtime"):
                assert node.module == "runtime.artifact", f"{path}: imports {node.module}"


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
    env = {**os.environ, "UIW_HOME": str(home), "UIW_ARTIFACTS": str(demo_artifact)}
    proc = subprocess.run([PY, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ok": True, "bad": []}
