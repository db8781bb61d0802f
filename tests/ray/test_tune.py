"""Tune on the local Ray cluster: ASHA over 4 trials x 2 workers, results, best config, restore."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fmray.config import load_config, validate_config
from fmray.train import sft
from fmray.tune import search
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.ray

# Good learning rates first: the two weak trials reach the first rung after the strong ones
# recorded theirs, so ASHA stops them there, whatever the timing of the concurrent pair.
LEARNING_RATES = [3e-3, 1e-3, 1e-4, 1e-5]


def tune_config(model_dir: Path, out: Path) -> search.TuneConfig:
    return validate_config(
        search.TuneConfig,
        {
            "run": {"name": "search", "output_dir": str(out)},
            "recipe": "sft",
            "base": str(REPO_ROOT / "jobs" / "sft" / "tiny.yaml"),
            "overrides": {
                "model.path": str(model_dir),
                "train.max_steps": 12,
                "train.eval_every": 3,
                "train.warmup_steps": 0,
                "checkpoint.every_steps": 0,
                "eval.num_examples": 8,
                "eval.max_new_tokens": 8,
                "logging.tensorboard": False,
            },
            "search_space": {"train.lr": f"grid({LEARNING_RATES})"},
            "num_samples": 1,
            "scheduler": {"name": "asha", "grace_period": 3, "reduction_factor": 2},
        },
    )


def test_asha_search_stops_trials_early_and_writes_a_runnable_best_config(
    ray_cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = tune_config(tiny_model_dir, tmp_path)
    search.run(config)
    exp_dir = tmp_path / "search"

    rows = list(csv.DictReader((exp_dir / "results.csv").open()))
    assert len(rows) == 4
    assert sorted(float(r["config/train.lr"]) for r in rows) == sorted(LEARNING_RATES)
    statuses = [r["status"] for r in rows]
    assert statuses.count("completed") >= 1 and statuses.count("stopped early") >= 1
    summary = json.loads((exp_dir / "best.json").read_text())
    steps = [int(r["steps"]) for r in rows]
    assert summary["total_steps"] == sum(steps) < 4 * 12
    assert summary["best_params"]["train.lr"] in (3e-3, 1e-3)

    # The best config is what `fmray sft --config` loads and checks before starting Ray.
    best_config = load_config(sft.SFTConfig, summary["best_config"])
    sft.check_inputs(best_config)
    assert best_config.train.lr == summary["best_params"]["train.lr"]
    assert best_config.train.max_steps == 12 and best_config.run.name == "search-best"
    assert best_config.model.path == str(tiny_model_dir.resolve())

    # Lineage: the best checkpoint names its experiment, trial and the config that made it.
    checkpoint = Path(summary["best_checkpoint"])
    meta = json.loads((checkpoint / "fmray.json").read_text())
    assert meta["experiment"] == "search" and meta["trial_id"] == summary["best_trial"]
    trial_config = yaml.safe_load((checkpoint / "fmray.yaml").read_text())
    assert trial_config["train"]["lr"] == summary["best_params"]["train.lr"]
    assert (Path(summary["best_hf_export"]) / "model.safetensors").is_file()

    # Running the same search again restores it (Tuner.restore) and finds the same best.
    search.run(config)
    again = json.loads((exp_dir / "best.json").read_text())
    assert again["best_trial"] == summary["best_trial"]
    assert again["total_steps"] == summary["total_steps"]


def test_pbt_runs_lora_trials_in_checkpointed_segments(
    ray_cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = validate_config(
        search.TuneConfig,
        {
            "run": {"name": "pbt", "output_dir": str(tmp_path)},
            "recipe": "sft",
            "base": str(REPO_ROOT / "jobs" / "sft" / "tiny_lora.yaml"),
            "overrides": {
                "model.path": str(tiny_model_dir),
                "lora.r": 4,
                "lora.alpha": 8.0,
                "train.max_steps": 4,
                "train.eval_every": 2,
                "train.warmup_steps": 0,
                "checkpoint.every_steps": 0,
                "eval.num_examples": 0,
                "scaling.num_workers": 1,
                "logging.tensorboard": False,
            },
            "search_space": {"train.lr": "choice([3e-3, 1e-5])"},
            "num_samples": 2,
            "scheduler": {"name": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5},
        },
    )
    search.run(config)
    exp_dir = tmp_path / "pbt"

    rows = list(csv.DictReader((exp_dir / "results.csv").open()))
    assert [(r["status"], int(r["steps"])) for r in rows] == [("completed", 4)] * 2
    for row in rows:
        # The trial's last segment continued from the checkpoint its first segment (or the
        # trial PBT cloned) left: LoRA adapters, optimizer and step come back from it.
        final = Path(row["checkpoint"])
        meta = json.loads((final / "fmray.json").read_text())
        assert meta["step"] == 4 and meta["adapter"]
        assert meta["experiment"] == "pbt" and meta["trial_id"] == row["trial_id"]
        assert meta["resumed_from_step"] == 2
        assert json.loads((Path(meta["resumed_from"]) / "fmray.json").read_text())["step"] == 2
        assert (final / "adapter" / "adapter_config.json").is_file()
    best_config = load_config(sft.SFTConfig, str(exp_dir / "best_config.yaml"))
    assert best_config.lora is not None and best_config.lora.r == 4
