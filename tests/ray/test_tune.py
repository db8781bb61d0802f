"""A real search on the local Ray cluster: a DPO trial (searching `dpo.beta`, optimising the
held-out margin) that is a 2-worker Ray Train + DeepSpeed run, its evaluations reaching Tune
through Ray Train's callback, the results table, the best config and the lineage of its
checkpoint. Nothing in fmray/tune knows DPO: the recipe registry says what it reports. Tune's
scheduling (ASHA stopping, PBT segments) is tested with a fake recipe in test_tune_plumbing.py;
SFT itself in test_sft.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fmray.config import load_config, validate_config
from fmray.train import dpo
from fmray.tune import search
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.ray

BETAS = [0.2]


def tune_config(model_dir: Path, out: Path) -> search.TuneConfig:
    return validate_config(
        search.TuneConfig,
        {
            "run": {"name": "search", "output_dir": str(out)},
            "recipe": "dpo",
            "base": str(REPO_ROOT / "jobs" / "dpo" / "tiny.yaml"),
            "overrides": {
                "model.path": str(model_dir),
                "train.max_steps": 6,
                "train.eval_every": 3,
                "train.warmup_steps": 0,
                "train.lr": 1e-3,
                "checkpoint.every_steps": 0,
                "eval.num_examples": 8,
                "eval.max_new_tokens": 8,
                "logging.tensorboard": False,
            },
            "search_space": {"dpo.beta": f"grid({BETAS})"},
            "metric": "val_margin",
            "mode": "max",
            "num_samples": 1,
            "scheduler": {"name": "asha", "grace_period": 3, "reduction_factor": 2},
        },
    )


def test_search_of_real_dpo_trials_reports_and_writes_a_runnable_best_config(
    ray_cluster: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = tune_config(tiny_model_dir, tmp_path)
    search.run(config)
    exp_dir = tmp_path / "search"

    rows = list(csv.DictReader((exp_dir / "results.csv").open()))
    # One trial: scheduling over many is tested with the fake recipe; this checks the real path.
    assert [(float(r["config/dpo.beta"]), r["status"], r["steps"]) for r in rows] == [
        (0.2, "completed", "6")
    ]
    assert float(rows[0]["val_margin"]) > 0  # the policy moved away from its reference
    summary = json.loads((exp_dir / "best.json").read_text())
    assert summary["best_params"]["dpo.beta"] == 0.2
    assert summary["total_steps"] == sum(int(r["steps"]) for r in rows)

    # The best config is what `fmray dpo --config` loads and checks before starting Ray.
    best_config = load_config(dpo.DPOConfig, summary["best_config"])
    dpo.check_inputs(best_config)
    assert best_config.dpo.beta == 0.2
    assert best_config.train.max_steps == 6 and best_config.run.name == "search-best"
    assert best_config.model.path == str(tiny_model_dir.resolve())

    # Lineage: the best checkpoint names its experiment, trial and the config that made it.
    checkpoint = Path(summary["best_checkpoint"])
    meta = json.loads((checkpoint / "fmray.json").read_text())
    assert meta["experiment"] == "search" and meta["trial_id"] == summary["best_trial"]
    assert meta["kind"] == "causal_lm" and meta["step"] == 6
    trial_config = yaml.safe_load((checkpoint / "fmray.yaml").read_text())
    assert trial_config["dpo"]["beta"] == 0.2
    assert (Path(summary["best_hf_export"]) / "model.safetensors").is_file()
    # Each trial recorded its workers' placement group, so a stopped trial's can be freed.
    assert all((exp_dir / r["trial_id"] / "run" / "placement_groups.txt").is_file() for r in rows)
