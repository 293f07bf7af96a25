"""One sweep point: compile (a child process), then the artifact, the naive baseline and the floor,
each in fresh processes, with the page cache warm and evicted, for some rounds. Returns records."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.proc import Child, run_child

# Children must not see the developer's or the parent's settings (as tests/conftest.child_env).
LEAKY = ("UIW_RECIPES", "UIW_HOME", "UIW_ARTIFACTS", "UIW_LOCK", "HF_HUB_OFFLINE", "HF_TOKEN", "CIVITAI_TOKEN")
CACHES = ("warm", "evicted")


@dataclass(frozen=True)
class Point:
    """One sweep point's settings (bench/conf/config.yaml)."""

    recipe: str  # a recipe name, or "stack" for the generated SD 1.5 stack
    recipes_dir: str
    precision: str | None  # None: the recipe's own
    compile: str | None
    home: Path
    stack: Any | None  # bench.stack.Stack when the point is the generated stack
    rounds: int
    caches: tuple[str, ...]
    requests: int
    width: int
    height: int
    steps: int
    prompt: str
    baselines: bool
    timeout: float


def child_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LEAKY}
    return {**env, "UIW_HOME": str(home), **(extra or {})}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "safetensors", "peft"):
        out[dist] = metadata.version(dist)
    return out


def machine() -> str:
    import psutil

    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()} {os.cpu_count()} cpu, {mem:.0f} GiB, {platform.system()} {platform.release()}"


@contextmanager
def config_hub(stack: Any | None) -> Iterator[dict[str, str]]:
    """The family config repo on the loopback Hub while a stack recipe compiles (a base-less
    checkpoint locks and fetches it, as a user's compile does)."""
    if stack is None:
        yield {}
        return
    from compiler.families import FAMILIES
    from tests.helpers.fakehub import FakeHub, tree

    hub = FakeHub().start()
    try:
        hub.repo(FAMILIES["sd15"].config_repo.removeprefix("hf://")).push(tree(Path(stack.configs)))
        yield {"HF_ENDPOINT": hub.url, "HF_HOME": str(Path(stack.folder) / "hf-home")}
    finally:
        hub.stop()


def compile_point(p: Point) -> tuple[Path, Child]:
    args = ["-m", "compiler", f"recipe={p.recipe}", f"recipes_dir={p.recipes_dir}"]
    if p.precision:
        args.append(f"precision={p.precision}")
    if p.compile:
        args.append(f"compile={p.compile}")
    with config_hub(p.stack) as extra:
        child = run_child(args, child_env(p.home, extra), timeout=p.timeout)
    return Path(child.stdout.strip().splitlines()[-1]), child


def weight_files(artifact: Path) -> list[Path]:
    return sorted(artifact.rglob("*.safetensors"))


def probe(kind: str, targets: list[str], p: Point, env: dict[str, str], precision: str) -> tuple[dict[str, Any], Child]:
    args = ["-m", "bench.probe", kind, *targets]
    args += ["--requests", str(p.requests), "--width", str(p.width), "--height", str(p.height)]
    args += ["--steps", str(p.steps), "--precision", precision, "--prompt", p.prompt]
    # --spawned last: run_child stamps it (the fork time) through this placeholder
    child = run_child_spawned(args, env, p.timeout)
    return child.last_json(), child


def run_child_spawned(args: list[str], env: dict[str, str], timeout: float) -> Child:
    import time

    return run_child([*args, "--spawned", repr(time.time())], env, timeout=timeout)


def measure(p: Point, evict: Any, sink: Any = None) -> list[dict[str, Any]]:
    """Records for one point: one compile record, then per round and page-cache state one record
    per measured kind (artifact; naive and floor when the point has a stack and baselines).
    ``sink(records)``, when given, gets each record as soon as it is measured (a long sweep cut
    short keeps what it measured)."""
    emit = sink or (lambda records: None)
    artifact, compiled = compile_point(p)
    manifest = json.loads((artifact / "manifest.json").read_text())
    precision = p.precision or manifest["runtime"]["dtype"]
    base = {
        "recipe": p.recipe if p.stack is None else p.stack.recipe,
        "precision": precision,
        "compile": p.compile or "recipe",
        "machine": machine(),
        **{f"v_{k}": v for k, v in versions().items()},
    }
    records = [
        {
            **base,
            "kind": "compile",
            "seconds": compiled.seconds,
            "peak_rss": compiled.peak_rss,
            "artifact": str(artifact),
            "artifact_bytes": sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()),
        }
    ]
    emit(records[-1:])
    env = child_env(p.home, {"HF_HUB_OFFLINE": "1"})
    kinds = measured_kinds(p, artifact)
    for rnd in range(p.rounds):
        for cache in p.caches:
            for kind, targets, files in kinds:
                if cache == "evicted":
                    evict(files)
                result, child = probe(kind.split("_")[0], targets, p, env, precision)
                records.append({**base, "kind": kind, "round": rnd, "cache": cache, **probe_record(result, child)})
                emit(records[-1:])
    return records


def measured_kinds(p: Point, artifact: Path) -> list[tuple[str, list[str], list[Path]]]:
    """(kind, the probe's targets, the files its page cache state is about) per measurement."""
    kinds: list[tuple[str, list[str], list[Path]]] = [("artifact", [str(artifact)], [artifact])]
    if p.stack is not None and p.baselines:
        stack_files = p.stack.weight_files
        configs = Path(p.stack.configs)
        kinds += [
            ("naive", [p.stack.folder], [*stack_files, configs]),
            ("floor_checkpoint", [str(f) for f in stack_files], stack_files),
            ("floor_artifact", [str(f) for f in weight_files(artifact)], weight_files(artifact)),
        ]
    return kinds


def probe_record(result: dict[str, Any], child: Child) -> dict[str, Any]:
    """A probe's JSON as a record: warm request times as p50/p95, load steps flattened."""
    warm = result.pop("warm", [])
    return {
        "peak_rss": child.peak_rss,
        "wall": child.seconds,
        "requests": len(warm),
        "warm_p50": _pct(warm, 50),
        "warm_p95": _pct(warm, 95),
        **{k: v for k, v in result.items() if k != "steps"},
        **{f"step_{k}": v for k, v in result.get("steps", {}).items()},
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    from bench.probe import percentile

    return percentile(values, q)
