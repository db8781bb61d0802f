"""What a search leaves behind: the trials table (printed + CSV), the best config and lineage.

    fmray tune --config jobs/tune/sft_tiny.yaml     # ends by printing this module's summary
    python -c "import csv; print(list(csv.DictReader(open('runs/tune-sft-tiny/results.csv'))))"

A trial's score is the metric of its last evaluation (what ASHA and PBT compare). Steps run are
read from the trial's own run folders (metrics.jsonl, PBT segments' checkpoints), so a trial ASHA
stopped counts the steps it really ran.
The best config is the recipe config of the best trial, renamed so that running it starts a fresh
run: `fmray <recipe> --config <experiment>/best_config.yaml`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fmray.config import dump_config, validate_config
from fmray.tune.space import Distribution, apply_params

# A PBT trial runs in segments, each a Ray Train run in <trial>/segment-<start step>-<id>.
SEGMENT_PREFIX = "segment-"


def segment_name(start: int, run_id: str) -> str:
    return f"{SEGMENT_PREFIX}{start:08d}-{run_id}"


def segment_start(name: str) -> int:
    """The step a segment started at, from its folder's `segment_name`."""
    return int(name.removeprefix(SEGMENT_PREFIX).split("-")[0])


def steps_run(trial_dir: Path, result: Any) -> int:
    """Optimizer steps the trial executed, from its own run folders.

    Not from Tune's result.json: Tune copies that file back from the experiment's storage each
    time a paused trial resumes, and a copy not yet synced there drops the newest results (PBT
    pauses every trial at every interval). A PBT trial sums its segments, each from the step it
    started at (its folder's name) to its newest complete checkpoint, the one it reported; a
    segment re-run after a clone counts again.
    """
    from fmray.checkpoint.exporters import checkpoint_records

    segments = [p for p in trial_dir.glob(f"{SEGMENT_PREFIX}*") if p.is_dir()]
    if segments:
        total = 0
        for folder in segments:
            records = checkpoint_records(str(folder))
            if records:
                total += records[-1][0] - segment_start(folder.name)
        return total
    logged = [0]
    for path in trial_dir.glob("*/metrics.jsonl"):
        logged += [
            json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line
        ]
    return max(max(logged), int((result.metrics or {}).get("step", 0)))


def latest_checkpoint(trial_dir: Path) -> str | None:
    """The trial's newest complete fmray checkpoint (all of a trial's Ray Train runs)."""
    from fmray.checkpoint import latest_checkpoint as newest

    return newest([str(p) for p in sorted(trial_dir.iterdir()) if p.is_dir()])


def trial_row(result: Any, metric: str, max_steps: int) -> dict[str, Any]:
    trial_dir = Path(result.path)
    steps = steps_run(trial_dir, result)
    score = (result.metrics or {}).get(metric)
    if result.error is not None:
        status = "error"
    elif score is None:
        status = "unfinished"  # interrupted before its first evaluation
    elif steps < max_steps:
        status = "stopped early"
    else:
        status = "completed"
    return {
        "trial_id": trial_dir.name,
        "status": status,
        "steps": steps,
        metric: float(score) if score is not None else math.nan,
        **{f"config/{k}": v for k, v in sorted(result.config.items())},
        "checkpoint": latest_checkpoint(trial_dir) or "",
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[format_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if not math.isnan(r[metric])]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(scored, key=lambda r: sign * r[metric])


def write_best_config(
    config: Any,
    base: dict[str, Any],
    params: dict[str, Any],
    out_path: Path,
    header: str,
) -> None:
    """The best trial's recipe config as YAML that the recipe's command accepts."""
    from fmray.recipes import recipe_config_class

    config_class = recipe_config_class(config.recipe)
    tree = apply_params(base, {**params, "run.name": f"{config.run.name}-best"})
    best = validate_config(config_class, tree)
    out_path.write_text(header + dump_config(best))


def summarize(
    results: Any, config: Any, base: dict[str, Any], space: dict[str, Distribution], exp_dir: Path
) -> dict[str, Any]:
    """Print and write the trials table, the best config and best.json; return the summary."""
    metric, max_steps = config.metric, base["train"]["max_steps"]
    rows = [trial_row(result, metric, max_steps) for result in results]
    rows.sort(key=lambda r: r["trial_id"])
    with (exp_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(format_table(rows))
    summary: dict[str, Any] = {
        "experiment": config.run.name,
        "metric": metric,
        "mode": config.mode,
        "total_steps": sum(r["steps"] for r in rows),
        "num_stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "results_csv": str(exp_dir / "results.csv"),
    }
    best = best_row(rows, metric, config.mode)
    if best is not None:
        params = {k.removeprefix("config/"): v for k, v in best.items() if k.startswith("config/")}
        header = (
            f"# Best of search {config.run.name!r}: trial {best['trial_id']} with "
            f"{metric}={best[metric]:.6g} after {best['steps']} steps.\n"
            f"#   fmray {config.recipe} --config {exp_dir / 'best_config.yaml'}\n"
        )
        write_best_config(config, base, params, exp_dir / "best_config.yaml", header)
        checkpoint = best["checkpoint"] or None
        summary.update(
            best_trial=best["trial_id"],
            best_metric=best[metric],
            best_params=params,
            best_config=str(exp_dir / "best_config.yaml"),
            best_checkpoint=checkpoint,
            best_hf_export=f"{checkpoint}/hf" if checkpoint else None,
        )
    (exp_dir / "best.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print("[fmray] search done.")
    print(f"  trials table   {summary['results_csv']}")
    print(
        f"  total steps    {summary['total_steps']} ({summary['num_stopped_early']} stopped early)"
    )
    if "best_trial" in summary:
        score = f"{summary['metric']}={summary['best_metric']:.4g}"
        print(f"  best trial     {summary['best_trial']} ({score})")
        print(f"  best params    {summary['best_params']}")
        print(f"  best config    {summary['best_config']}")
        print(f"  checkpoint     {summary['best_checkpoint']}")
        print(f"  HF export      {summary['best_hf_export']}")
