"""The compiler as users run it: `python -m compiler recipe=NAME [overrides]` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import PY, REPO, run_compiler

DEMO_FIELDS = "base: builtin:tiny-sd15\nprecision: fp32\nscheduler: K_EULER\ndefaults:\n  steps: 4\n"


def write_recipe(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.yaml"
    p.write_text(text)
    return p


def test_compile_writes_a_complete_artifact(demo_artifact: Path, home: Path):
    from runtime.artifact import content_digest, read_manifest, sha256_file
    from runtime.integrity import verify_files

    assert demo_artifact.is_absolute() and demo_artifact.parent == home / "artifacts" / "v1"
    m = read_manifest(demo_artifact)
    assert m.cache_key == demo_artifact.name
    assert m.recipe == "demo" and m.family == "sd15" and m.pipeline_class == "StableDiffusionPipeline"
    assert m.serving.scheduler == "K_EULER"
    assert (m.serving.defaults.width, m.serving.defaults.height, m.serving.defaults.steps) == (64, 64, 4)
    assert (m.serving.limits.max_width, m.serving.limits.max_height) == (1024, 1024)
    assert m.provenance["base"] == "builtin:tiny-sd15@1"
    assert set(m.components) >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert verify_files(demo_artifact, m) == []
    # Every file is listed with its real hash; only safetensors weights; READY is last.
    on_disk = sorted(p.relative_to(demo_artifact).as_posix() for p in demo_artifact.rglob("*") if p.is_file())
    assert on_disk == sorted([f.path for f in m.files] + ["manifest.json", "READY"])
    assert all(sha256_file(demo_artifact / f.path) == f.sha256 for f in m.files)
    assert not [f for f in on_disk if f.endswith((".bin", ".pt", ".ckpt", ".pkl"))]
    # content_digest is checkable with coreutils: sha256 of sorted `sha256sum` lines.
    lines = subprocess.run(
        ["sha256sum", *[f.path for f in sorted(m.files, key=lambda f: f.path)]],
        cwd=demo_artifact,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    import hashlib

    assert hashlib.sha256(lines.encode()).hexdigest() == m.content_digest == content_digest(m.files)
    name = json.loads((home / "names" / "demo.json").read_text())
    assert name["current"]["cache_key"] == m.cache_key


def test_stdout_is_one_line_and_no_hydra_folders(tmp_path: Path, home: Path, demo_artifact: Path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_compiler("recipe=demo", f"recipes_dir={REPO / 'recipes'}", home=home, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{demo_artifact}\n"
    assert list(cwd.iterdir()) == []  # no outputs/, .hydra/, multirun/


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ctime_ns, p.stat().st_size) for p in [root, *root.rglob("*")]}


def test_cache_hit_imports_no_torch_and_touches_nothing(home: Path, demo_artifact: Path):
    before = _snapshot(demo_artifact)
    name_before = _snapshot(home / "names")
    code = (
        "import sys, json\n"
        "from compiler.cli import main\n"
        f"rc = main(['recipe=demo', 'home={home}'])\n"
        "sys.stderr.write(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, "
        "'diffusers': 'diffusers' in sys.modules}) + '\\n')\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"rc": 0, "torch": False, "diffusers": False}, proc.stderr
    assert proc.stdout == f"{demo_artifact}\n"
    assert _snapshot(demo_artifact) == before
    assert _snapshot(home / "names") == name_before
    assert elapsed < 10, f"a cache hit took {elapsed:.1f} s"  # measured ~0.9 s here; a guard, not a benchmark


def test_precedence_conf_then_recipe_then_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Composition alone (pure Hydra, in process): conf/ < recipe file < command line."""
    from compiler.compose import compose

    recipes, other = tmp_path / "recipes", tmp_path / "other"
    write_recipe(recipes, "r", "base: builtin:tiny-sd15\n")
    write_recipe(recipes, "s", "base: builtin:tiny-sd15\nprecision: bf16\ndefaults:\n  steps: 4\n")
    write_recipe(other, "s", "base: builtin:tiny-sd15\nprecision: fp16\n")
    monkeypatch.setenv("UIW_RECIPES", str(recipes))
    assert compose(["recipe=r"]).fields["precision"] == "fp32"  # conf default
    assert compose(["recipe=s"]).fields["precision"] == "bf16"  # the recipe wins over conf
    c = compose(["recipe=s", "precision=fp32", "defaults.steps=9", "+defaults.width=128"])
    assert c.fields["precision"] == "fp32" and c.fields["defaults"] == {"steps": 9, "width": 128}
    assert c.path == (recipes / "s.yaml").resolve()
    # recipes_dir on the command line wins over UIW_RECIPES.
    c2 = compose(["recipe=s", f"recipes_dir={other}"])
    assert c2.path == (other / "s.yaml").resolve() and c2.fields["precision"] == "fp16"
    monkeypatch.setenv("UIW_HOME", str(tmp_path / "h"))
    assert compose(["recipe=s"]).home == (tmp_path / "h").resolve()
    assert compose(["recipe=s", f"home={tmp_path / 'g'}"]).home == (tmp_path / "g").resolve()


def test_overrides_change_the_artifact_and_names_keep_history(tmp_path: Path):
    from runtime.artifact import read_manifest

    recipes, home = tmp_path / "recipes", tmp_path / "home"
    write_recipe(recipes, "mine", DEMO_FIELDS)
    proc = run_compiler(
        "recipe=mine",
        "precision=fp16",
        "scheduler=DDIM",
        "defaults.steps=3",
        home=home,
        env={"UIW_RECIPES": str(recipes)},
    )
    assert proc.returncode == 0, proc.stderr
    art = Path(proc.stdout.strip())
    m = read_manifest(art)
    assert (m.runtime.dtype, m.serving.scheduler, m.serving.defaults.steps) == ("fp16", "DDIM", 3)
    with safe_open(str(art / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}  # noqa: SIM118 (safe_open is not iterable)
    # Without the overrides the recipe's own values hold, and it is another artifact.
    plain = run_compiler("recipe=mine", home=home, env={"UIW_RECIPES": str(recipes)})
    m2 = read_manifest(Path(plain.stdout.strip()))
    assert (m2.runtime.dtype, m2.serving.scheduler, m2.serving.defaults.steps) == ("fp32", "K_EULER", 4)
    assert m2.cache_key != m.cache_key
    names = json.loads((home / "names" / "mine.json").read_text())
    assert names["current"]["cache_key"] == m2.cache_key
    assert [h["cache_key"] for h in names["history"]] == [m.cache_key]


@pytest.mark.parametrize(
    ("recipe", "args", "expected"),
    [
        (DEMO_FIELDS + "colour: red\n", [], ["colour: unknown key", "valid keys here: base, checkpoint, family"]),
        (DEMO_FIELDS, ["+extra=1"], ["extra: unknown key"]),
        (DEMO_FIELDS + "hypernetworks:\n  - ./style.pt\n", [], ["hypernetworks.0: Input should be"]),
        (DEMO_FIELDS, ["+defaults.sharpness=2"], ["defaults.sharpness: unknown key", "valid keys here: width"]),
        (DEMO_FIELDS, ["precision=fp8"], ["precision:", "fp8", "hint: one of fp32, fp16, bf16"]),
        (DEMO_FIELDS, ["scheduler=EULER"], ["scheduler: unknown scheduler 'EULER'", "K_EULER"]),
        ("precision: fp32\n", [], ["base: a recipe needs `base:` or `checkpoint:`"]),
        (DEMO_FIELDS, ["base=hf://org/repo"], ["base:", "cannot reach http://127.0.0.1:9", "HF_ENDPOINT"]),
        (DEMO_FIELDS, ["base=builtin:nope"], ["no built-in model 'nope'", "builtin:tiny-sd15"]),
        (DEMO_FIELDS, ["base=builtin:tiny-sd15@7"], ["revision 7 is not available"]),
        (DEMO_FIELDS, ["defaults.width=100"], ["defaults.width", "multiple of 8"]),
        (DEMO_FIELDS, ["defaults.width='64'"], ["defaults.width", "valid integer"]),
        (DEMO_FIELDS, ["defaults.width=2048"], ["defaults.width: 2048 exceeds limits.max_width = 1024"]),
        (DEMO_FIELDS + "recipes_dir: x\n", [], ["recipes_dir", "compiler setting"]),
        ("- a\n- b\n", [], ["expected a mapping"]),
        ("base: [unclosed\n", [], ["not valid YAML"]),
        (DEMO_FIELDS, ["precision=fp16,bf16"], ["sweep"]),
    ],
)
def test_user_errors_exit_2_with_where_what_hint(tmp_path: Path, recipe: str, args: list[str], expected: list[str]):
    recipes = tmp_path / "recipes"
    path = write_recipe(recipes, "bad", recipe)
    # A closed loopback port as the Hub: a source that needs it fails fast and offline.
    offline = {"HF_ENDPOINT": "http://127.0.0.1:9", "UIW_HTTP_RETRIES": "0"}
    proc = run_compiler("recipe=bad", f"recipes_dir={recipes}", *args, home=tmp_path / "home", env=offline)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "hint:" in proc.stderr
    for fragment in expected:
        assert fragment in proc.stderr, proc.stderr
    assert path.is_file()  # the recipe is never rewritten or removed
    assert not list((tmp_path / "home").glob("artifacts/v1/*/READY"))


def test_all_recipe_problems_are_reported_together(tmp_path: Path):
    recipes = tmp_path / "recipes"
    write_recipe(
        recipes, "bad", "base: builtin:tiny-sd15\nprecision: fp64\nscheduler: X\ndefaults:\n  width: 65\n  colour: 1\n"
    )
    proc = run_compiler("recipe=bad", f"recipes_dir={recipes}", home=tmp_path / "home")
    assert proc.returncode == 2
    recipe_file = str((recipes / "bad.yaml").resolve())
    for where in ("precision", "scheduler", "defaults.width", "defaults.colour"):
        assert f"{recipe_file}: {where}:" in proc.stderr, proc.stderr


def test_missing_recipe_lists_the_known_ones(tmp_path: Path):
    proc = run_compiler("recipe=nosuch", home=tmp_path / "home")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "no recipe file" in proc.stderr and "demo" in proc.stderr
    proc = run_compiler(home=tmp_path / "home")
    assert proc.returncode == 2 and "recipe=NAME" in proc.stderr
    proc = run_compiler("recipe=../etc/passwd", home=tmp_path / "home")
    assert proc.returncode == 2 and "expected a recipe name" in proc.stderr


def test_internal_failure_exits_1_with_empty_stdout(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "artifacts").write_text("a file where the store expects a folder")
    proc = run_compiler("recipe=demo", home=home)
    assert proc.returncode == 1 and proc.stdout == ""


def test_sigkill_mid_materialize_leaves_no_artifact_and_the_next_run_succeeds(tmp_path: Path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "UIW_RECIPES"}
    env["UIW_HOME"] = str(home)
    proc = subprocess.Popen(
        [PY, "-m", "compiler", "recipe=demo"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    store = home / "artifacts" / "v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(store.glob(".staging-*")):
        time.sleep(0.02)
    staged = list(store.glob(".staging-*"))
    assert staged, "the build never started staging"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    finished = [p for p in store.iterdir() if not p.name.startswith(".")]
    assert finished == [], "a killed build must not leave a final artifact folder"
    assert not (home / "names" / "demo.json").exists()

    again = run_compiler("recipe=demo", home=home)
    assert again.returncode == 0, again.stderr
    art = Path(again.stdout.strip())
    assert (art / "READY").is_file()
    assert not list(store.glob(".staging-*")), "the stale staging folder is cleaned up"


def test_installed_wheel_finds_conf_and_recipes(tmp_path: Path):
    """A non-editable install (the Docker image) carries conf/ and recipes/ inside the package."""
    import zipfile

    build = subprocess.run(
        [PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0:
        pytest.fail(build.stderr)
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "compiler/_bundled/conf/config.yaml" in names
    assert "compiler/_bundled/recipes/demo.yaml" in names
    # Run the compiler from the unpacked wheel, away from the checkout: it must find both.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "UIW_RECIPES"}
    env.update({"PYTHONPATH": str(site), "UIW_HOME": str(tmp_path / "home")})
    code = "import compiler.compose as c, sys; cc = c.compose(['recipe=demo']); print(cc.path)"
    proc = subprocess.run([PY, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(site / "compiler" / "_bundled" / "recipes" / "demo.yaml")
