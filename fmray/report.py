"""Reports of run folders: loss and metric curves as PNG and a short text summary.

    fmray report runs/pretrain-tiny                  # writes runs/pretrain-tiny/report/
    fmray report runs/sft-tiny runs/dpo-tiny --index runs/report.html   # + a page linking both
    fmray report runs/tune-sft-tiny --out /tmp/tune-report
    python -m fmray report runs/diffusion-tiny       # the same as `fmray report`

Any recipe's run folder works: the recipe is recognised from the sections of its config.yaml
(pretrain, sft, reward, dpo, ppo, grpo, diffusion) or from results.csv (a Tune search). A report
folder holds curves.png (every logged metric against the step, training loss and held-out loss
on one panel), summary.txt (the key metrics of that recipe: first, last and best value, the
newest checkpoint), index.html (both on one page) and, for diffusion, each checkpoint's sample
grid; a Tune search gets one curve per trial (trials.png) and its trials table.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fmray.config import ConfigError

REPORT_DIR = "report"
# The metrics that say how a recipe did, in the order its summary shows them.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "pretrain": ("loss", "val_loss"),
    "sft": ("loss", "val_loss", "val_exact_match"),
    "reward": ("loss", "val_loss", "val_accuracy", "val_margin"),
    "dpo": ("loss", "val_loss", "val_accuracy", "val_margin", "val_exact_match"),
    "ppo": ("reward_mean", "kl", "val_reward", "val_exact_match"),
    "grpo": ("reward_mean", "kl", "val_reward", "val_exact_match"),
    "diffusion": ("loss", "val_loss", "colour_acc", "shape_acc", "position_acc"),
}
# Logged every step but not worth a panel of their own.
NOT_PLOTTED = ("step", "elapsed_s")


@dataclass
class Series:
    """One metric's values against the steps that logged it."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def first(self) -> tuple[int, float]:
        return self.steps[0], self.values[0]

    def last(self) -> tuple[int, float]:
        return self.steps[-1], self.values[-1]


@dataclass
class Report:
    """What `write_report` found and wrote for one run folder."""

    run_dir: Path
    kind: str
    out_dir: Path
    key_metrics: dict[str, Series]
    checkpoint: str | None
    summary: str
    files: list[Path]


# --- reading a run folder


def read_metrics(path: Path) -> dict[str, Series]:
    """metrics.jsonl -> one Series per numeric key (NaN and missing values skipped)."""
    series: dict[str, Series] = {}
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key == "step" or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if math.isnan(float(value)):
                continue
            entry = series.setdefault(key, Series())
            entry.steps.append(step)
            entry.values.append(float(value))
    return series


def detect_kind(run_dir: Path) -> str:
    """The recipe that wrote `run_dir`: 'tune', or the recipe whose config sections match
    config.yaml's."""
    from fmray.recipes import recipe_config_class, recipe_names

    if (run_dir / "results.csv").is_file() or (run_dir / "tuner.pkl").is_file():
        return "tune"
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(
            f"fmray report: {run_dir} is not a run folder (no config.yaml, no results.csv)"
        )
    sections = set((yaml.safe_load(config_file.read_text()) or {}).keys())
    for name in recipe_names():
        if name in ("tokenizer", "tune", "serve"):
            continue
        if set(recipe_config_class(name).model_fields) == sections:
            return name
    raise ConfigError(f"fmray report: {config_file} is no recipe's config (sections {sections})")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the run's complete checkpoints (an fmray.json each), oldest first."""
    found = []
    for path in sorted(run_dir.glob("checkpoint_*")):
        meta = path / "fmray.json"
        if path.is_dir() and meta.is_file():
            found.append((int(json.loads(meta.read_text()).get("step", 0)), path))
    return sorted(found)


# --- drawing


def plot_panels(panels: list[tuple[str, dict[str, Series]]], path: Path, title: str) -> None:
    """A grid of panels, each one or more named series against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_cols = min(3, max(1, len(panels)))
    num_rows = max(1, math.ceil(len(panels) / num_cols))
    figure = Figure(figsize=(4.2 * num_cols, 3.0 * num_rows), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    axes = figure.subplots(num_rows, num_cols, squeeze=False).ravel()
    for ax, (name, lines) in zip(axes, panels, strict=False):
        for label, line in lines.items():
            marker = "o" if len(line.steps) <= 12 else None
            ax.plot(line.steps, line.values, label=label, marker=marker, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.savefig(path, dpi=90)


def metric_panels(series: dict[str, Series], kind: str) -> list[tuple[str, dict[str, Series]]]:
    """Loss with held-out loss first, then the recipe's key metrics, then everything else."""
    panels: list[tuple[str, dict[str, Series]]] = []
    shown: set[str] = set(NOT_PLOTTED)
    if "loss" in series:
        pair = {k: series[k] for k in ("loss", "val_loss") if k in series}
        panels.append(("loss" if len(pair) == 1 else "loss / val_loss", pair))
        shown.update(pair)
    for key in KEY_METRICS.get(kind, ()) + tuple(sorted(series)):
        if key in series and key not in shown:
            panels.append((key, {key: series[key]}))
            shown.add(key)
    return panels


# --- one run


def metric_line(name: str, line: Series, mode: str = "max") -> str:
    (first_step, first), (last_step, last) = line.first(), line.last()
    best = max(line.values) if mode == "max" else min(line.values)
    text = f"  {name:<16} {last:.4g} at step {last_step}"
    if len(line.values) > 1:
        text += f" (first {first:.4g} at step {first_step}, best {best:.4g})"
    return text


def summarize_run(run_dir: Path, kind: str, series: dict[str, Series]) -> tuple[str, str | None]:
    """The summary text of a recipe's run folder and its newest checkpoint."""
    found = checkpoints(run_dir)
    last_step = max((s.last()[0] for s in series.values()), default=0)
    lines = [f"{kind} run {run_dir}", f"  {'steps logged':<16} {last_step}"]
    for key in KEY_METRICS.get(kind, ()):
        if key in series:
            mode = "min" if "loss" in key or key == "kl" else "max"
            lines.append(metric_line(key, series[key], mode))
    newest = str(found[-1][1]) if found else None
    if found:
        steps = ", ".join(str(step) for step, _ in found)
        lines.append(f"  {'checkpoints':<16} steps {steps}; newest {newest}")
        meta = json.loads((found[-1][1] / "fmray.json").read_text())
        lines.append(f"  {'checkpoint kind':<16} {meta.get('kind', 'causal_lm')}")
    else:
        lines.append(f"  {'checkpoints':<16} none")
    if (run_dir / "tensorboard").is_dir():
        lines.append(f"  {'tensorboard':<16} tensorboard --logdir {run_dir / 'tensorboard'}")
    return "\n".join(lines) + "\n", newest


def copy_sample_grids(run_dir: Path, out_dir: Path) -> list[Path]:
    """Each checkpoint's samples.png, as samples_step_<N>.png in the report."""
    copied = []
    for step, path in checkpoints(run_dir):
        grid = path / "samples.png"
        if grid.is_file():
            target = out_dir / f"samples_step_{step:08d}.png"
            shutil.copyfile(grid, target)
            copied.append(target)
    return copied


def report_recipe_run(run_dir: Path, kind: str, out_dir: Path) -> Report:
    series = read_metrics(run_dir / "metrics.jsonl")
    if not series:
        raise ConfigError(f"fmray report: {run_dir / 'metrics.jsonl'} holds no metrics yet")
    files = [out_dir / "curves.png"]
    plot_panels(metric_panels(series, kind), files[0], f"{kind}: {run_dir.name}")
    summary, newest = summarize_run(run_dir, kind, series)
    if kind == "diffusion":
        grids = copy_sample_grids(run_dir, out_dir)
        files += grids
        if grids:
            summary += f"  {'sample grids':<16} {', '.join(p.name for p in grids)}\n"
    key = {k: series[k] for k in KEY_METRICS.get(kind, ()) if k in series}
    return Report(run_dir, kind, out_dir, key, newest, summary, files)


# --- a Tune search


def read_trials(exp_dir: Path) -> dict[str, dict[str, Series]]:
    """trial id -> its metrics (all of its Ray Train runs, PBT segments included, by step)."""
    trials: dict[str, dict[str, Series]] = {}
    for path in sorted(exp_dir.glob("*/*/metrics.jsonl")):
        trial_id = path.parent.parent.name
        merged = trials.setdefault(trial_id, {})
        for key, line in read_metrics(path).items():
            entry = merged.setdefault(key, Series())
            pairs = sorted(zip(entry.steps + line.steps, entry.values + line.values, strict=True))
            entry.steps = [s for s, _ in pairs]
            entry.values = [v for _, v in pairs]
    return trials


def report_search(exp_dir: Path, out_dir: Path) -> Report:
    best_file = exp_dir / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else {}
    metric = best.get("metric", "val_loss")
    trials = read_trials(exp_dir)
    if not trials:
        raise ConfigError(f"fmray report: {exp_dir} holds no trial metrics yet")
    panels = []
    for key in dict.fromkeys([metric, "loss", "val_loss"]):
        lines = {trial: series[key] for trial, series in trials.items() if key in series}
        if lines:
            panels.append((key, lines))
    files = [out_dir / "trials.png"]
    plot_panels(panels, files[0], f"tune: {exp_dir.name} ({len(trials)} trials)")
    lines = [f"tune search {exp_dir}", f"  {'trials':<16} {len(trials)}"]
    table = exp_dir / "results.csv"
    if table.is_file():
        with table.open() as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            score = row.get(metric, "")
            try:
                score = f"{float(score):.4g}"
            except ValueError:
                pass  # empty: the trial never evaluated
            lines.append(
                f"  trial {row['trial_id']:<10} {row['status']:<14} "
                f"{row['steps']:>5} steps  {metric} {score}"
            )
    key: dict[str, Series] = {}
    if "best_trial" in best:
        lines.append(
            f"  {'best trial':<16} {best['best_trial']} ({metric}={best['best_metric']:.4g}) "
            f"{best['best_params']}"
        )
        lines.append(f"  {'best config':<16} {best['best_config']}")
        key[f"best {metric}"] = Series([0], [float(best["best_metric"])])
    checkpoint = best.get("best_checkpoint")
    return Report(exp_dir, "tune", out_dir, key, checkpoint, "\n".join(lines) + "\n", files)


# --- pages


def write_run_page(report: Report) -> Path:
    """index.html of one report: the summary and every image."""
    images = "\n".join(
        f'<figure><img src="{p.name}" style="max-width:100%"><figcaption>{html.escape(p.name)}'
        "</figcaption></figure>"
        for p in report.files
    )
    page = report.out_dir / "index.html"
    page.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{report.run_dir.name}</title>"
        f"</head><body><h1>{html.escape(report.kind)}: {html.escape(report.run_dir.name)}</h1>"
        f"<pre>{html.escape(report.summary)}</pre>\n{images}\n</body></html>\n"
    )
    return page


def write_index(
    reports: list[Report],
    path: Path,
    rows: list[list[str]] | None = None,
    images: list[Path] | None = None,
) -> Path:
    """A page linking each report (and a table, e.g. the quickstart's summary, and images above
    them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = ""
    if rows:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in rows[1:]
        )
        table = f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table>"
    for image in images or []:
        source = relative_to(image, path.parent)
        table += f'<figure><img src="{source}" width="256"><figcaption>{image.name}</figcaption>'
        table += "</figure>"
    items = []
    for report in reports:
        link = Path(relative_to(report.out_dir / "index.html", path.parent))
        first = report.files[0].name if report.files else ""
        thumb = f'<br><img src="{link.parent / first}" width="480">' if first else ""
        items.append(
            f'<li><a href="{link}">{html.escape(report.kind)}: '
            f"{html.escape(report.run_dir.name)}</a>{thumb}</li>"
        )
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>fmray runs</title></head>"
        f"<body><h1>fmray runs</h1>{table}<ul>{''.join(items)}</ul></body></html>\n"
    )
    return path


def relative_to(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Curves, summary and page of one run folder (default: <run_dir>/report/)."""
    run_dir = Path(run_dir)
    if "://" in str(run_dir):
        raise ConfigError(f"fmray report: {run_dir} is remote; copy the run folder here first")
    if not run_dir.is_dir():
        raise ConfigError(f"fmray report: run folder {run_dir} does not exist")
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    kind = detect_kind(run_dir)
    if kind == "tune":
        report = report_search(run_dir, out)
    else:
        report = report_recipe_run(run_dir, kind, out)
    (out / "summary.txt").write_text(report.summary)
    write_run_page(report)
    return report


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fmray report",
        description="Curves (PNG), a text summary and an HTML page for run folders.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a recipe's run folder")
    parser.add_argument("--out", help="report folder (one run only; default RUN_DIR/report)")
    parser.add_argument("--index", help="also write an HTML page linking every report")
    args = parser.parse_args(argv)
    if args.out and len(args.run_dirs) > 1:
        raise ConfigError("fmray report: --out takes one RUN_DIR (each run gets RUN_DIR/report)")
    reports = []
    for run_dir in args.run_dirs:
        report = write_report(run_dir, args.out)
        print(report.summary, end="")
        print(f"  {'report':<16} {report.out_dir / 'index.html'}")
        reports.append(report)
    if args.index:
        print(f"[fmray] index {write_index(reports, Path(args.index))}")
