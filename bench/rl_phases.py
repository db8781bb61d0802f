"""Where an RL step's time goes: generation, scoring and training of a GRPO and a PPO step.

    .venv/bin/python bench/rl_phases.py --policy runs/sft-tiny --reward-model runs/reward-tiny
    .venv/bin/python bench/rl_phases.py --policy runs/sft-tiny --reward-model runs/reward-tiny \
        --steps 20 --zero-stage 3 --out runs/rl-phases

Runs `fmray grpo` (exact-match rule) and `fmray ppo` (reward model + rule) from the tiny presets
for a few steps each on the embedded local Ray, then reads each run's metrics.jsonl: the median
seconds per step of each phase (`timing/generation`, `timing/scoring`, `timing/training`), its
share of the step, and generation tokens/s. The first step is left out (warm-up). OpenRLHF
reports generation as about 80% of RLHF time at scale; on a tiny CPU model the updates weigh more.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from statistics import median

PHASES = ("generation", "scoring", "training")


def run_recipe(name: str, overrides: list[str]) -> Path:
    from fmray.cli import main

    main([name, "--config", f"jobs/{name}/tiny.yaml", *overrides])
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.output_dir="))
    return Path(out) / f"{name}-tiny"


def phase_table(run_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "timing/generation" in r][1:]
    if not steps:
        raise SystemExit(f"{run_dir}: no step records past the first")
    row = {phase: median(r[f"timing/{phase}"] for r in steps) for phase in PHASES}
    row["step"] = median(r["step_time_s"] for r in steps)
    row["tokens_per_s"] = median(r["generation_tokens_per_s"] for r in steps)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="SFT run folder or HF directory")
    parser.add_argument("--reward-model", required=True, help="reward run folder or HF directory")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--out", default=None, help="run folders go here (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="fmray-rl-phases-")
    common = [
        f"model.path={args.policy}",
        f"run.output_dir={out}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
        f"checkpoint.every_steps={args.steps}",
        f"zero.stage={args.zero_stage}",
        "eval.num_examples=16",
        "checkpoint.resume=never",
        "logging.tensorboard=false",
    ]
    rows = {
        "grpo": phase_table(run_recipe("grpo", common)),
        "ppo": phase_table(run_recipe("ppo", [*common, f"reward.model={args.reward_model}"])),
    }
    where = f"ZeRO-{args.zero_stage}, 2 workers"
    print(f"\n[bench] RL step phases, median over steps 2-{args.steps}, {where}")
    header = f"{'recipe':<7}{'step s':>8}" + "".join(f"{p + ' s':>14}{'share':>7}" for p in PHASES)
    print(header + f"{'gen tok/s':>11}")
    for name, row in rows.items():
        cells = "".join(f"{row[p]:>14.3f}{100 * row[p] / row['step']:>6.0f}%" for p in PHASES)
        print(f"{name:<7}{row['step']:>8.3f}{cells}{row['tokens_per_s']:>11,.0f}")
    print(f"[bench] runs in {out}")


if __name__ == "__main__":
    main()
