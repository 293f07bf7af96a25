"""Shared fixtures: one compiled demo artifact per session, a loaded service, subprocess helpers."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share two cores: one compute thread each (and in every subprocess they
    # start) runs the suite in parallel instead of oversubscribing the cores. Results stay exact:
    # every image comparison is made within one process.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
PY = sys.executable


# Variables of this test process that a child compiler must not see: HF_HUB_OFFLINE is set here by
# the in-process runtime (runtime.loader); UIW_HOME/UIW_ARTIFACTS by the session's service fixture;
# the rest would make a test depend on the developer's own settings and tokens.
LEAKY = ("UIW_RECIPES", "UIW_HOME", "UIW_ARTIFACTS", "UIW_LOCK", "HF_HUB_OFFLINE", "HF_TOKEN", "CIVITAI_TOKEN")


def child_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a compiler subprocess: this one's, less LEAKY, with the store and extras."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKY}
    return {**env, "UIW_HOME": str(home), **(extra or {})}


def run_compiler(
    *args: str,
    home: Path,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    module: str = "compiler",
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", module, *args], cwd=cwd, env=child_env(home, env), capture_output=True, text=True, timeout=timeout
    )


# The demo recipe's serving settings: an artifact compiled with them draws the demo's pixels for
# the same request, so tests compare their images with the demo artifact's.
DEMO_SETTINGS = """precision: fp32
scheduler: K_EULER
defaults:
  steps: 4
  guidance_scale: 7.5
  negative_prompt: blurry, low quality
"""


def compile_text(tmp_path: Path, name: str, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Write ``tmp_path/recipes/NAME.yaml`` and compile it into the store ``tmp_path/home``."""
    recipes = tmp_path / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / f"{name}.yaml").write_text(text)
    return run_compiler(f"recipe={name}", f"recipes_dir={recipes}", *args, home=tmp_path / "home")


def decode_image(data_uri: str) -> np.ndarray:
    from PIL import Image

    header, _, payload = data_uri.partition(",")
    assert header == "data:image/png;base64"
    return np.array(Image.open(io.BytesIO(base64.b64decode(payload))))


REQ = {"prompt": "a red fox in the snow", "seed": 7}


def serve(home: Path, artifact: Path, request: dict) -> np.ndarray:
    from runtime.service import Service, Settings

    reply = Service(Settings(artifacts=(str(artifact),), home=home)).run(request)
    assert "images" in reply, reply
    return decode_image(reply["images"][0])


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uiw-home")


@pytest.fixture(scope="session")
def demo_artifact(home: Path) -> Path:
    proc = run_compiler("recipe=demo", home=home)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


@pytest.fixture(scope="session")
def demo_image(home: Path, demo_artifact: Path) -> np.ndarray:
    return serve(home, demo_artifact, REQ)


@pytest.fixture(scope="session")
def service_env(home: Path, demo_artifact: Path):
    """The in-process runtime serving the demo artifact through its recipe name."""
    import runtime.service as service

    saved = {k: os.environ.get(k) for k in ("UIW_ARTIFACTS", "UIW_HOME")}
    os.environ["UIW_ARTIFACTS"] = "demo"
    os.environ["UIW_HOME"] = str(home)
    service._service = None
    yield service.get_service()
    service._service = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def call(service_env):
    """Run the real handler on one job input, as the SDK would (a fresh event loop each call)."""
    import asyncio

    from runtime.handler import handler

    def _call(job_input: object) -> dict:
        return asyncio.run(handler({"id": "test", "input": job_input}))

    return _call


def run_store(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m compiler.store --home HOME ARGS...` as a user runs it, in the child environment."""
    return run_compiler("--home", str(home), *args, home=home, timeout=timeout, module="compiler.store")
