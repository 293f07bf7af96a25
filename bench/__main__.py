"""`python -m bench [-m] key=value ...`: the Hydra sweep app (config: bench/conf/config.yaml).

One Hydra job is one sweep point: bench.measure.measure compiles and measures it; its records are
appended to results.jsonl and results.csv in the sweep folder (the run folder without -m); the
report callback (bench.report.ReportCallback) writes the plot and summary when the sweep ends.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bench.measure import CACHES, Point, measure
from bench.proc import evict
from bench.report import append_records


def out_dir() -> Path:
    """The sweep folder in a multirun (shared by its jobs), else the run folder."""
    hc = HydraConfig.get()
    return Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir).absolute()


def point(cfg: DictConfig, out: Path) -> Point:
    caches = tuple(cfg.caches)
    if unknown := [c for c in caches if c not in CACHES]:
        raise SystemExit(f"bench: caches {unknown} unknown. hint: caches=[warm,evicted] (or one of them)")
    stack = None
    recipe, recipes_dir = str(cfg.recipe), str(cfg.recipes_dir)
    if recipe == "stack":
        from bench.stack import build

        stack = build(Path(cfg.stack.folder or out / f"stack-{cfg.stack.size}"), str(cfg.stack.size))
        recipe, recipes_dir = stack.recipe, stack.recipes_dir
    compile_ = cfg.compile
    if compile_ is False:  # YAML/Hydra read a bare `off` as false
        compile_ = "off"
    return Point(
        recipe=recipe,
        recipes_dir=recipes_dir,
        precision=cfg.precision,
        compile=None if compile_ is None else str(compile_),
        home=Path(cfg.home or out / "home"),
        stack=stack,
        rounds=int(cfg.rounds),
        caches=caches,
        requests=int(cfg.requests),
        width=int(cfg.width),
        height=int(cfg.height),
        steps=int(cfg.steps),
        prompt=str(cfg.prompt),
        baselines=bool(cfg.baselines),
        timeout=float(cfg.timeout),
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    job = HydraConfig.get().job.num if HydraConfig.get().mode == RunMode.MULTIRUN else 0
    measure(point(cfg, out), evict, lambda records: append_records(out, [{"job": job, **r} for r in records]))


if __name__ == "__main__":
    main()
