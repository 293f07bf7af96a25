"""Two cheap artifacts for the serving tests: builtin tiny-sd15 compiled twice, once with the demo's
serving settings (``fox-euler``) and once with DDIM as its scheduler (``fox-ddim``): same weights,
different pixels for the same request. Compiled once per test session into one store, and a
worker subprocess (the RunPod SDK's local dev server) helper shared by the tests that use them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_SETTINGS, compile_text
from tests.helpers.devserver import dev_server, post

A, B = "fox-euler", "fox-ddim"
RECIPES = {
    A: "base: builtin:tiny-sd15\n" + DEMO_SETTINGS,
    B: "base: builtin:tiny-sd15\n" + DEMO_SETTINGS.replace("scheduler: K_EULER", "scheduler: DDIM"),
}


@dataclass(frozen=True)
class Pair:
    home: Path
    paths: dict[str, Path]  # recipe name -> artifact directory


_cache: dict[str, Pair] = {}


def compiled_pair(factory: pytest.TempPathFactory) -> Pair:
    if "pair" not in _cache:
        root = factory.mktemp("pair")
        paths = {}
        for name, text in RECIPES.items():
            proc = compile_text(root, name, text)
            assert proc.returncode == 0, proc.stderr
            paths[name] = Path(proc.stdout.strip())
        assert paths[A].name != paths[B].name
        _cache["pair"] = Pair(root / "home", paths)
    return _cache["pair"]


@dataclass
class Worker:
    url: str
    log: Path

    def run(self, job_input: dict) -> dict:
        """POST /runsync; the job's output (a failed job's error comes back as {"error": ...})."""
        out = post(f"{self.url}/runsync", {"input": job_input})
        if out.get("status") == "FAILED":
            return {"error": out.get("error"), "failed": True}
        assert out.get("status") == "COMPLETED", out
        return out["output"]


@contextmanager
def worker(home: Path, env: dict[str, str], log: Path, timeout: float = 180) -> Iterator[Worker]:
    """`python -m runtime --rp_serve_api` on 127.0.0.1 with these settings, stopped afterwards."""
    with dev_server({"UIW_HOME": str(home), **env}, log.parent, startup_s=timeout, log_path=log) as server:
        yield Worker(server.url, log)
