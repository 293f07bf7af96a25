"""Sweep records -> results.jsonl / results.csv (appended per job), and at the end of a sweep a
summary (min and median over rounds, side-by-side ratios) in summary.md / summary.json and a plot
in results.png.

    python -m bench.report DIR      # the same report for a finished (or interrupted) sweep folder
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

JSONL, CSV, PNG, SUMMARY = "results.jsonl", "results.csv", "results.png", "summary.md"
METRICS = ("imports", "ready", "first_image", "cold_start", "warm_p50", "warm_p95", "peak_rss", "gpu_peak")
# (label, numerator kind, denominator kind, metric): side-by-side ratios, per cache state
RATIOS = (
    ("naive / artifact ready", "naive", "artifact", "ready"),
    ("naive / artifact first image", "naive", "artifact", "first_image"),
    ("naive / artifact cold start", "naive", "artifact", "cold_start"),
    ("artifact ready / floor (artifact bytes)", "artifact", "floor_artifact", "ready"),
    ("artifact ready / floor (checkpoint+adapters)", "artifact", "floor_checkpoint", "ready"),
)


def read_records(folder: Path) -> list[dict[str, Any]]:
    path = folder / JSONL
    if not path.is_file():
        raise SystemExit(f"{path}: no bench records. hint: the folder a `python -m bench` run printed or wrote")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_records(folder: Path, records: list[dict[str, Any]]) -> None:
    """Append to the JSONL, then rewrite the CSV from it (columns are the union over records, so a
    later point with more fields does not break the header)."""
    with (folder / JSONL).open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    write_csv(folder, read_records(folder))


def write_csv(folder: Path, records: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    with (folder / CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def _point(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r.get("job", 0), r["recipe"], r["precision"], r["compile"])


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (point, kind, cache): min and median of each metric over rounds, and the
    point's compile seconds; then the ratios of medians, per point and cache."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    compiles: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "compile":
            compiles[_point(r)] = r
        else:
            groups.setdefault((*_point(r), r["kind"], r["cache"]), []).append(r)
    rows = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(("job", "recipe", "precision", "compile", "kind", "cache"), key, strict=True))
        row["rounds"] = len(rs)
        row["compile_s"] = compiles.get(key[:4], {}).get("seconds")
        for m in METRICS:
            values = [r[m] for r in rs if r.get(m) is not None]
            if values:
                row[f"{m}_min"] = min(values)
                row[f"{m}_median"] = statistics.median(values)
        for k in rs[0]:
            if k.startswith("step_"):
                row[f"{k}_median"] = statistics.median(r[k] for r in rs)
        rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["job"], r["kind"], r["cache"]): r for r in rows}
    out = []
    for job in sorted({r["job"] for r in rows}):
        for cache in sorted({r["cache"] for r in rows}):
            for label, num, den, metric in RATIOS:
                a, b = by.get((job, num, cache)), by.get((job, den, cache))
                if a and b and a.get(f"{metric}_median") and b.get(f"{metric}_median"):
                    out.append(
                        {
                            "job": job,
                            "cache": cache,
                            "ratio": label,
                            "median": a[f"{metric}_median"] / b[f"{metric}_median"],
                            "min": a[f"{metric}_min"] / b[f"{metric}_min"],
                        }
                    )
    return out


def _fmt(v: Any, metric: str = "") -> str:
    if v is None:
        return "–"
    if metric.startswith(("peak_rss", "gpu_peak")):
        return f"{v / 2**30:.2f} GiB"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown(records: list[dict[str, Any]]) -> str:
    rows, rats = summarize(records), None
    rats = ratios(rows)
    first = records[0]
    lines = [
        f"machine: {first.get('machine')}; "
        + ", ".join(f"{k[2:]} {v}" for k, v in first.items() if k.startswith("v_")),
        "",
        "Seconds as `median (min)` over rounds; peak RSS of the measuring process.",
        "",
        "| job | recipe | precision | compile | kind | cache | rounds | imports | ready | first image | cold start "
        "| warm p50 | warm p95 | peak RSS | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["job"], r["cache"], r["kind"])):
        cells = [str(r[k]) for k in ("job", "recipe", "precision", "compile", "kind", "cache", "rounds")]
        for m in ("imports", "ready", "first_image", "cold_start", "warm_p50", "warm_p95"):
            med = r.get(f"{m}_median")
            cells.append("–" if med is None else f"{med:.2f} ({r[f'{m}_min']:.2f})")
        cells.append(_fmt(r.get("peak_rss_median"), "peak_rss"))
        cells.append(_fmt(r.get("compile_s")))
        lines.append("| " + " | ".join(cells) + " |")
    steps = [r for r in rows if any(k.startswith("step_") for k in r)]
    if steps:
        lines += ["", "Naive worker's steps (median seconds):", ""]
        for r in steps:
            parts = ", ".join(f"{k[5:-7]} {v:.2f}" for k, v in r.items() if k.startswith("step_"))
            lines.append(f"- job {r['job']}, {r['cache']}: {parts}")
    if rats:
        lines += ["", "| job | cache | ratio | of medians | of minima |", "|---|---|---|---|---|"]
        for q in rats:
            lines.append(f"| {q['job']} | {q['cache']} | {q['ratio']} | {q['median']:.2f}x | {q['min']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars per sweep point: ready, first image and cold start (medians) for each measured
    kind and cache state; compile seconds on its own axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(records)
    jobs = sorted({r["job"] for r in rows})
    labels = {r["job"]: f"{r['recipe']}\n{r['precision']} compile={r['compile']}" for r in rows}
    series = sorted({(r["kind"], r["cache"]) for r in rows})
    metrics = ("ready", "first_image", "cold_start")
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5 * (len(metrics) + 1), 4.5), squeeze=False)
    width = 0.8 / max(1, len(series))
    by = {(r["job"], r["kind"], r["cache"]): r for r in rows}
    for ax, metric in zip(axes[0], metrics, strict=False):
        for i, (kind, cache) in enumerate(series):
            ys = [(by.get((j, kind, cache)) or {}).get(f"{metric}_median") or 0.0 for j in jobs]
            ax.bar([x + i * width for x in range(len(jobs))], ys, width, label=f"{kind} ({cache})")
        ax.set_title(metric.replace("_", " ") + " (s, median)")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(jobs))], [labels[j] for j in jobs])
        ax.tick_params(axis="x", labelsize=7)
    compile_s = {r["job"]: r.get("compile_s") or 0.0 for r in rows}
    axes[0][-1].bar(range(len(jobs)), [compile_s[j] for j in jobs], color="grey")
    axes[0][-1].set_title("compile (s)")
    axes[0][-1].set_xticks(range(len(jobs)), [labels[j] for j in jobs])
    axes[0][-1].tick_params(axis="x", labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(folder: Path) -> Path:
    records = read_records(folder)
    text = markdown(records)
    (folder / SUMMARY).write_text(text)
    rows = summarize(records)
    (folder / "summary.json").write_text(json.dumps({"rows": rows, "ratios": ratios(rows)}, indent=1))
    plot(records, folder / PNG)
    return folder / SUMMARY


class ReportCallback(Callback):
    """Hydra callback: the report of the whole sweep (or of a single run) when it ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(Path(config.hydra.sweep.dir))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(Path(config.hydra.run.dir))

    @staticmethod
    def _report(folder: Path) -> None:
        if (folder / JSONL).is_file():
            print(write_report(folder.absolute()).read_text())
            print(f"bench report: {folder.absolute()}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.report SWEEP_DIR")
    print(write_report(Path(args[0])).read_text())


if __name__ == "__main__":
    main()
