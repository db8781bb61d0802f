"""ASHA against the full grid on the same search space: best eval metric and training steps.

    fmray pretrain --config jobs/pretrain/tiny.yaml            # the base model (CPU)
    python bench/tune_efficiency.py --model runs/pretrain-tiny
    python bench/tune_efficiency.py --model runs/pretrain-tiny --steps 60 --num-cpus 6
    python bench/tune_efficiency.py --model runs/pretrain-tiny --grid-dir runs/bench-tune-1/grid \
        --reduction-factor 4      # ASHA again, against a grid already run with the same settings

Both searches run the tiny SFT job (2 workers per trial) over the same grid of learning rates and
warmup lengths. The baseline runs every point to the end (FIFO); ASHA runs the same points and
stops the ones trailing at a rung. The grid is listed in a seeded random order: a grid search
does not care, and ASHA's outcome depends on arrival order, so a sorted list would be its best
or worst case rather than the typical one. Target: ASHA's best val_loss within 5% of the grid's
best, for at most 50% of the grid's training steps.

Because one ASHA run shows one arrival order, the bench also replays ASHA's stopping rule (Ray's
rung cutoff, trials arriving one at a time) on the grid's own recorded eval curves for many
random orders, and prints how often both targets hold.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

LEARNING_RATES = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
WARMUP_STEPS = [0, 10]
METRIC_TARGET = 1.05  # ASHA's best may be at most 5% worse than the grid's
STEPS_TARGET = 0.50  # ... for at most half of the grid's steps


def search_config(args: argparse.Namespace, scheduler: dict[str, Any], name: str) -> Any:
    from fmray.config import validate_config
    from fmray.tune.search import TuneConfig

    order = random.Random(args.seed)
    rates, warmups = LEARNING_RATES[:], WARMUP_STEPS[:]
    order.shuffle(rates)
    order.shuffle(warmups)
    return validate_config(
        TuneConfig,
        {
            "run": {"name": name, "output_dir": args.out},
            "recipe": "sft",
            "base": str(REPO_ROOT / "jobs" / "sft" / "tiny.yaml"),
            "overrides": {
                "model.path": args.model,
                "train.max_steps": args.steps,
                "train.eval_every": args.steps // 8,
                "checkpoint.every_steps": 0,
                "eval.num_examples": 0,  # val_loss decides; skip generation
                "logging.tensorboard": False,
                "logging.progress": False,
            },
            "search_space": {
                "train.lr": f"grid({rates})",
                "train.warmup_steps": f"grid({warmups})",
            },
            "metric": "val_loss",
            "mode": "min",
            "num_samples": 1,
            "scheduler": scheduler,
            "resume": "never",
        },
    )


def eval_curves(grid_dir: Path) -> list[dict[int, float]]:
    """Each grid trial's val_loss by step, from its metrics.jsonl."""
    curves = []
    for path in sorted(grid_dir.glob("*/run/metrics.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        curves.append({r["step"]: r["val_loss"] for r in records if "val_loss" in r})
    return curves


def replay_asha(
    curves: list[dict[int, float]], grace: int, rf: float, max_steps: int, order: list[int]
) -> tuple[int, float]:
    """(total steps, best final val_loss) of ASHA on recorded curves, trials in `order`.

    Same rule as Ray's ASHA bracket: at each rung a trial stops if its reward (-val_loss) is
    below the (1 - 1/rf) quantile of the rewards recorded there before it.
    """
    import numpy as np

    rungs = [grace * rf**k for k in range(int(math.log(max_steps / grace, rf)) + 1)]
    recorded: dict[float, list[float]] = {rung: [] for rung in rungs}
    total, finals = 0, []
    for index in order:
        stop = max_steps
        for rung in rungs[:-1] if rungs[-1] >= max_steps else rungs:
            reward = -curves[index][int(rung)]
            seen = recorded[rung]
            cutoff = np.nanpercentile(seen, (1 - 1 / rf) * 100) if seen else None
            seen.append(reward)
            if cutoff is not None and reward < cutoff:
                stop = int(rung)
                break
        total += stop
        if stop == max_steps:
            finals.append(curves[index][max_steps])
    return total, min(finals)


def replay_summary(grid_dir: Path, grace: int, rf: float, max_steps: int, num_orders: int) -> str:
    curves = eval_curves(grid_dir)
    grid_best, grid_steps = min(c[max_steps] for c in curves), len(curves) * max_steps
    steps_ratios, metric_ok, both_ok = [], 0, 0
    for seed in range(num_orders):
        order = random.Random(seed).sample(range(len(curves)), len(curves))
        steps, best = replay_asha(curves, grace, rf, max_steps, order)
        steps_ratios.append(steps / grid_steps)
        metric_ok += best / grid_best <= METRIC_TARGET
        both_ok += best / grid_best <= METRIC_TARGET and steps / grid_steps <= STEPS_TARGET
    return (
        f"  asha replayed on the grid's curves, {num_orders} random orders: mean steps asha/grid "
        f"{sum(steps_ratios) / num_orders:.3f} | best within 5% in {metric_ok / num_orders:.0%} "
        f"| both targets in {both_ok / num_orders:.0%}"
    )


def run_search(config: Any) -> dict[str, Any]:
    from fmray.tune import search

    start = time.perf_counter()
    search.run(config)
    exp_dir = Path(config.run.output_dir).resolve() / config.run.name
    summary = json.loads((exp_dir / "best.json").read_text())
    summary["wall_s"] = time.perf_counter() - start
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/pretrain-tiny", help="base model or run folder")
    parser.add_argument("--steps", type=int, default=40, help="train.max_steps of every trial")
    parser.add_argument("--out", default=f"runs/bench-tune-{int(time.time())}")
    parser.add_argument("--seed", type=int, default=0, help="order in which the grid is listed")
    parser.add_argument("--num-cpus", type=int, default=0, help="logical CPUs of the local Ray")
    parser.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA's")
    parser.add_argument("--grid-dir", help="reuse this finished grid search (same --steps, seed)")
    args = parser.parse_args()
    args.model = str(Path(args.model).resolve())

    import ray

    from fmray.distributed.runtime import worker_env

    if args.num_cpus:
        ray.init(num_cpus=args.num_cpus, runtime_env={"env_vars": worker_env()})
    grace, rf = args.steps // 8, args.reduction_factor
    if args.grid_dir:  # the grid does not depend on ASHA's settings: reuse a finished one
        grid_dir = Path(args.grid_dir).resolve()
        grid = {**json.loads((grid_dir / "best.json").read_text()), "wall_s": float("nan")}
    else:
        grid = run_search(search_config(args, {"name": "fifo"}, "grid"))
        grid_dir = Path(args.out).resolve() / "grid"
    asha_scheduler = {"name": "asha", "grace_period": grace, "reduction_factor": rf}
    asha = run_search(search_config(args, asha_scheduler, f"asha-rf{rf:g}"))

    points = len(LEARNING_RATES) * len(WARMUP_STEPS)
    print(f"\n[bench] tune efficiency: sft tiny, {points} grid points x {args.steps} steps, ")
    print(f"        2 workers per trial, grid listed in seeded order {args.seed}")
    print(f"        asha: grace_period {grace}, reduction_factor {rf:g}")
    for name, result in (("grid (all to the end)", grid), ("asha", asha)):
        print(
            f"  {name:<22} best val_loss {result['best_metric']:.4f} {result['best_params']} | "
            f"total steps {result['total_steps']} | {result['num_stopped_early']} stopped early | "
            f"{result['wall_s']:.0f} s"
        )
    metric_ratio = asha["best_metric"] / grid["best_metric"]
    steps_ratio = asha["total_steps"] / grid["total_steps"]
    met = metric_ratio <= METRIC_TARGET and steps_ratio <= STEPS_TARGET
    print(
        f"  ratios                 best val_loss asha/grid {metric_ratio:.3f} "
        f"(target <= {METRIC_TARGET}) | steps asha/grid {steps_ratio:.3f} "
        f"(target <= {STEPS_TARGET}) -> {'target met' if met else 'target missed'}"
    )
    print(replay_summary(grid_dir, grace, rf, args.steps, num_orders=200))


if __name__ == "__main__":
    main()
