"""Search results without Ray: trial status and steps, best trial, best config, lineage paths."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fmray.config import load_config, validate_config
from fmray.train.sft import SFTConfig
from fmray.tune.results import best_row, latest_checkpoint, segment_name, summarize, trial_row
from fmray.tune.search import TuneConfig
from fmray.tune.space import parse_search_space
from tests.conftest import REPO_ROOT


@dataclass
class FakeResult:
    """The parts of a ray.tune Result that the summary reads."""

    path: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    error: Exception | None = None
    metrics_dataframe: pd.DataFrame | None = field(default=None)


def make_trial(root: Path, trial_id: str, logged_steps: int, checkpoints: list[int]) -> Path:
    run = root / trial_id / "run"
    run.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, logged_steps + 1)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for step in checkpoints:
        ckpt = run / f"checkpoint_{step:08d}"
        ckpt.mkdir()
        (ckpt / "fmray.json").write_text(json.dumps({"step": step, "trial_id": trial_id}))
    return root / trial_id


def test_trial_rows_classify_and_count_the_steps_really_run(tmp_path: Path) -> None:
    done = make_trial(tmp_path, "t0", 20, [10, 20])
    stopped = make_trial(tmp_path, "t1", 7, [])  # ASHA stopped it at 5; it had run 7
    config = {"train.lr": 1e-3}
    row = trial_row(FakeResult(str(done), {"step": 20, "val_loss": 0.5}, config), "val_loss", 20)
    assert row["status"] == "completed" and row["steps"] == 20
    assert row["checkpoint"] == str(done / "run" / "checkpoint_00000020")
    assert row["config/train.lr"] == 1e-3
    row = trial_row(FakeResult(str(stopped), {"step": 5, "val_loss": 2.0}, config), "val_loss", 20)
    assert row["status"] == "stopped early" and row["steps"] == 7 and row["checkpoint"] == ""
    failed = FakeResult(str(stopped), {"step": 5, "val_loss": 2.0}, config, RuntimeError("x"))
    assert trial_row(failed, "val_loss", 20)["status"] == "error"
    assert trial_row(FakeResult(str(stopped), {}, config), "val_loss", 20)["status"] == "unfinished"


def test_pbt_trials_count_their_segments_from_their_own_folders(tmp_path: Path) -> None:
    """Segments 0-10 and 10-20, then 10-20 again from a clone: 30 steps. A segment interrupted
    before its checkpoint adds nothing. Tune's result.json, which can lose rows when a paused
    trial resumes, is not read: a stale frame of one row changes nothing."""
    trial = tmp_path / "t0"
    for start, run_id, step in [(0, "aaaaaa", 10), (10, "bbbbbb", 20), (10, "cccccc", 20)]:
        ckpt = trial / segment_name(start, run_id) / f"checkpoint_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "fmray.json").write_text(json.dumps({"step": step, "trial_id": "t0"}))
    (trial / segment_name(20, "dddddd")).mkdir()  # started, killed before a checkpoint
    stale = pd.DataFrame({"step": [10], "segment_steps": [10]})
    result = FakeResult(str(trial), {"step": 20, "val_loss": 1.0}, {}, None, stale)
    row = trial_row(result, "val_loss", 20)
    assert row["steps"] == 30 and row["status"] == "completed"


def test_latest_checkpoint_prefers_the_newest_of_equal_steps(tmp_path: Path) -> None:
    trial = tmp_path / "t0"
    for segment, age in (("segment-a", 100), ("segment-b", 0)):
        ckpt = trial / segment / "checkpoint_00000020"
        ckpt.mkdir(parents=True)
        (ckpt / "fmray.json").write_text(json.dumps({"step": 20}))
        os.utime(ckpt, (1e9 - age, 1e9 - age))
    assert latest_checkpoint(trial) == str(trial / "segment-b" / "checkpoint_00000020")


def test_best_row_follows_the_mode() -> None:
    rows = [
        {"trial_id": "a", "status": "completed", "val_loss": 0.7},
        {"trial_id": "b", "status": "stopped early", "val_loss": 0.9},
        {"trial_id": "c", "status": "unfinished", "val_loss": float("nan")},
    ]
    assert best_row(rows, "val_loss", "min")["trial_id"] == "a"
    assert best_row(rows, "val_loss", "max")["trial_id"] == "b"
    assert best_row(rows[2:], "val_loss", "min") is None


def test_summary_writes_table_best_config_and_lineage(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(TuneConfig, REPO_ROOT / "jobs" / "tune" / "sft_tiny.yaml")
    base_config = load_config(SFTConfig, REPO_ROOT / "jobs" / "sft" / "tiny.yaml")
    base = validate_config(
        SFTConfig, {**base_config.model_dump(mode="json"), "model": {"path": str(tiny_model_dir)}}
    ).model_dump(mode="json")
    base["train"]["max_steps"] = 20
    space = parse_search_space(SFTConfig, config.search_space)
    results = [
        FakeResult(
            str(make_trial(tmp_path, "t0", 20, [20])),
            {"step": 20, "val_loss": 0.6},
            {"train.lr": 2e-3, "train.warmup_steps": 10},
        ),
        FakeResult(
            str(make_trial(tmp_path, "t1", 5, [])),
            {"step": 5, "val_loss": 1.4},
            {"train.lr": 1e-4, "train.warmup_steps": 0},
        ),
    ]
    summary = summarize(results, config, base, space, tmp_path)
    assert summary["best_trial"] == "t0" and summary["total_steps"] == 25
    assert summary["num_stopped_early"] == 1
    assert summary["best_hf_export"] == str(tmp_path / "t0/run/checkpoint_00000020/hf")
    best = load_config(SFTConfig, tmp_path / "best_config.yaml")
    assert best.train.lr == 2e-3 and best.train.warmup_steps == 10
    assert best.run.name == "tune-sft-tiny-best"
    assert (tmp_path / "best_config.yaml").read_text().startswith("# Best of search")
    assert json.loads((tmp_path / "best.json").read_text())["best_params"]["train.lr"] == 2e-3
    printed = capsys.readouterr().out
    assert "stopped early" in printed and "best config" in printed
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3


@dataclass
class FakeTrial:
    """The parts of a ray.tune Trial that TrialProgress reads."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None


def test_trial_progress_prints_one_line_per_trial_event(capsys: pytest.CaptureFixture) -> None:
    from fmray.tune.search import TrialProgress

    progress = TrialProgress("val_margin", max_steps=20)
    trial = FakeTrial("eb142_00000", {"train.lr": 5.58351861634097e-05, "dpo.beta": 0.21673})
    progress.on_trial_start(0, [], trial)
    trial.last_result = {"step": 20, "val_margin": 0.140643141050532}
    progress.on_trial_complete(1, [], trial)
    stopped = FakeTrial("eb142_00001", {"dpo.beta": 0.0549}, {"step": 10, "val_margin": 0.01169})
    progress.on_trial_complete(2, [], stopped)
    failed = FakeTrial("eb142_00002", {"dpo.beta": 0.1}, {"step": 10}, "/x/error.txt")
    progress.on_trial_error(3, [], failed)
    assert capsys.readouterr().out.splitlines() == [
        "[fmray] trial eb142_00000 started | dpo.beta=0.2167, train.lr=5.584e-05",
        "[fmray] trial eb142_00000 finished at step 20 | val_margin 0.1406",
        "[fmray] trial eb142_00001 stopped early at step 10 | val_margin 0.01169",
        "[fmray] trial eb142_00002 failed after step 10 | error: /x/error.txt",
    ]


def test_tune_console_uses_tunes_quiet_engine_unless_verbose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fmray.tune.search import tune_console

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    with tune_console(verbose=False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    with tune_console(verbose=True):
        assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    with tune_console(verbose=False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    tree = {"recipe": "sft", "search_space": {"train.lr": "loguniform(1e-5, 1e-3)"}}
    config = validate_config(TuneConfig, {**tree, "logging": {"verbose": True}})
    assert config.logging.verbose
