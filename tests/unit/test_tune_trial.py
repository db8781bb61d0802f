"""A restored search's trial whose run had already finished reports its recorded result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray.tune

from fmray.tune.trial import report_finished_run


def write_run(run: Path, records: list[dict[str, Any]], checkpoints: list[int]) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in checkpoints:
        ckpt = run / f"checkpoint_{step:08d}"
        ckpt.mkdir()
        (ckpt / "fmray.json").write_text(json.dumps({"step": step}))


@pytest.fixture
def reports(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dict, Any]]:
    sent: list[tuple[dict, Any]] = []
    monkeypatch.setattr(ray.tune, "report", lambda m, checkpoint=None: sent.append((m, checkpoint)))
    return sent


def test_the_newest_evaluation_and_checkpoint_stand_for_the_finished_run(
    tmp_path: Path, reports: list[tuple[dict, Any]]
) -> None:
    run = tmp_path / "t0" / "run"
    records = [
        {"step": 4, "loss": 0.9, "val_loss": 0.8},
        {"step": 6, "loss": 0.7},
        {"step": 8, "loss": 0.6, "val_loss": 0.5},
        {"step": 8, "summary": True},  # a later record without the metric is not the result
    ]
    write_run(run, records, [4, 8])
    report_finished_run(run, "val_loss")
    [(metrics, checkpoint)] = reports
    assert metrics == {"step": 8, "loss": 0.6, "val_loss": 0.5}
    assert checkpoint.path == str(run / "checkpoint_00000008")


def test_a_run_never_evaluated_reports_nothing(
    tmp_path: Path, reports: list[tuple[dict, Any]]
) -> None:
    run = tmp_path / "t0" / "run"
    write_run(run, [{"step": 1, "loss": 1.0}], [])
    report_finished_run(run, "val_loss")
    report_finished_run(tmp_path / "missing", "val_loss")
    assert reports == []
