"""Tune's plumbing with a fake recipe (tests/fake_recipe.py): real Tune, ASHA and PBT on the
session's Ray, trials that report a closed-form curve in milliseconds instead of Ray Train runs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fmray import recipes
from fmray.config import load_config, validate_config
from fmray.tune import search
from tests import fake_recipe
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.ray

LEARNING_RATES = [3e-3, 1e-3, 1e-4, 1e-5]


@pytest.fixture
def fake_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = recipes.Recipe(
        "tests.fake_recipe", "FakeConfig", "a fake recipe", ("val_loss",), pbt=True
    )
    monkeypatch.setitem(recipes.COMMANDS, "fake", entry)


def fake_search(out: Path, **fields: Any) -> search.TuneConfig:
    tree = {
        "run": {"name": "search", "output_dir": str(out)},
        "recipe": "fake",
        "overrides": {"train.max_steps": 8, "train.eval_every": 2},
        "search_space": {"train.lr": f"grid({LEARNING_RATES})"},
        "num_samples": 1,
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
        # One at a time: ASHA's decisions then follow the grid order.
        "max_concurrent_trials": 1,
        **fields,
    }
    return validate_config(search.TuneConfig, tree)


def test_asha_stops_trailing_trials_and_writes_a_runnable_best_config(
    ray_cluster: Any, fake_registered: None, tmp_path: Path
) -> None:
    config = fake_search(tmp_path)
    search.run(config)
    exp_dir = tmp_path / "search"

    rows = list(csv.DictReader((exp_dir / "results.csv").open()))
    by_lr = {float(r["config/train.lr"]): r for r in rows}
    assert sorted(by_lr) == sorted(LEARNING_RATES)
    # The best rate goes first and runs to the end; each later one trails it at the first rung.
    assert by_lr[3e-3]["status"] == "completed" and int(by_lr[3e-3]["steps"]) == 8
    for lr in LEARNING_RATES[1:]:
        assert (by_lr[lr]["status"], int(by_lr[lr]["steps"])) == ("stopped early", 2)
        assert float(by_lr[lr]["val_loss"]) == pytest.approx(fake_recipe.val_loss(lr, 2))
    summary = json.loads((exp_dir / "best.json").read_text())
    assert summary["total_steps"] == 8 + 3 * 2 and summary["num_stopped_early"] == 3
    assert summary["best_params"] == {"train.lr": 3e-3}
    assert summary["best_metric"] == pytest.approx(fake_recipe.val_loss(3e-3, 8))

    # The best config is what the recipe's command loads; its checkpoint names its lineage.
    best = load_config(fake_recipe.FakeConfig, summary["best_config"])
    assert best.train.lr == 3e-3 and best.train.max_steps == 8 and best.run.name == "search-best"
    meta = json.loads((Path(summary["best_checkpoint"]) / "fmray.json").read_text())
    assert meta["experiment"] == "search" and meta["trial_id"] == summary["best_trial"]
    assert meta["step"] == 8
    assert yaml.safe_load((Path(summary["best_checkpoint"]) / "fmray.yaml").read_text()) == {
        "train": {"lr": 3e-3}
    }

    # Running the same search again restores it (Tuner.restore) and finds the same best.
    search.run(config)
    again = json.loads((exp_dir / "best.json").read_text())
    assert again["best_trial"] == summary["best_trial"]
    assert again["total_steps"] == summary["total_steps"]


def test_pbt_runs_trials_in_segments_that_resume_from_checkpoints(
    ray_cluster: Any, fake_registered: None, tmp_path: Path
) -> None:
    config = fake_search(
        tmp_path,
        run={"name": "pbt", "output_dir": str(tmp_path)},
        overrides={"train.max_steps": 6, "train.eval_every": 2},
        search_space={"train.lr": "choice([3e-3, 1e-5])"},
        num_samples=2,
        # Synchronous: a trial that ran ahead and finished would leave the other nothing to
        # resume (it would clone the final checkpoint), which the loaded suite made happen.
        scheduler={
            "name": "pbt",
            "perturbation_interval": 2,
            "quantile_fraction": 0.5,
            "synch": True,
        },
        max_concurrent_trials=0,
    )
    search.run(config)
    exp_dir = tmp_path / "pbt"

    rows = list(csv.DictReader((exp_dir / "results.csv").open()))
    assert [(r["status"], int(r["steps"])) for r in rows] == [("completed", 6)] * 2
    for row in rows:
        # The last segment continued from the checkpoint the previous segment (or the trial
        # PBT cloned) left at step 4, in its own run folder.
        final = Path(row["checkpoint"])
        meta = json.loads((final / "fmray.json").read_text())
        assert meta["step"] == 6 and meta["resumed_from_step"] == 4
        assert meta["experiment"] == "pbt" and meta["trial_id"] == row["trial_id"]
        donor = json.loads((Path(meta["resumed_from"]) / "fmray.json").read_text())
        assert donor["step"] == 4
        assert final.parent.name.startswith("segment-00000004-")
    best_config = load_config(fake_recipe.FakeConfig, str(exp_dir / "best_config.yaml"))
    assert best_config.train.max_steps == 6


DRIVER = """
import sys
from fmray import recipes
from fmray.cli import main
recipes.COMMANDS["fake"] = recipes.Recipe(
    "tests.fake_recipe", "FakeConfig", "a fake recipe", ("val_loss",), pbt=True
)
main(sys.argv[1:])
"""


@pytest.mark.faults  # two driver starts: `make test-faults`
def test_search_whose_driver_is_killed_resumes_with_the_same_command(
    ray_cluster: Any, tmp_path: Path, record_property: Any
) -> None:
    """`fmray tune` SIGKILLed mid-search, then run again: the search continues where it was
    (finished trials are not run again) and ends with the uninterrupted search's results."""
    import ray

    config = {
        "run": {"name": "search", "output_dir": str(tmp_path)},
        "recipe": "fake",
        "overrides": {"train.max_steps": 8, "train.eval_every": 2, "step_seconds": 0.4},
        "search_space": {"train.lr": f"grid({LEARNING_RATES})"},
        "num_samples": 1,
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
        "max_concurrent_trials": 1,
    }
    config_file = tmp_path / "search.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-c", DRIVER, "tune", "--config", str(config_file)]
    command += ["--address", ray.get_runtime_context().gcs_address]
    exp_dir = tmp_path / "search"

    # --- the first driver dies once the first trial has finished and the second has started
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and first.poll() is None:
        finished = list(exp_dir.glob("*/run/checkpoint_00000008"))
        started = [p for p in exp_dir.glob("*/run/checkpoint_00000002") if finished]
        if finished and len(started) >= 2:
            break
        time.sleep(0.1)
    assert first.poll() is None, f"the search ended before it could be killed:\n{log.read_text()}"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    [finished_trial] = [p.parent.parent for p in exp_dir.glob("*/run/checkpoint_00000008")]
    assert not (exp_dir / "best.json").exists()

    # --- the same command again
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming the search" in second.stdout

    rows = list(csv.DictReader((exp_dir / "results.csv").open()))
    by_lr = {float(r["config/train.lr"]): r for r in rows}
    assert sorted(by_lr) == sorted(LEARNING_RATES)
    assert by_lr[3e-3]["status"] == "completed" and int(by_lr[3e-3]["steps"]) == 8
    summary = json.loads((exp_dir / "best.json").read_text())
    assert summary["best_params"] == {"train.lr": 3e-3}
    assert summary["best_metric"] == pytest.approx(fake_recipe.val_loss(3e-3, 8))
    # The trial that had finished before the kill was not run again: one line per step.
    steps = [json.loads(line)["step"] for line in (finished_trial / "run/metrics.jsonl").open()]
    assert steps == list(range(1, 9))
    record_property("tune_driver_kill", "driver SIGKILLed mid-search; resumed, same best trial")
