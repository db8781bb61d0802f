"""`fmray report` on run folders real recipes wrote: the session's SFT and reward-model fits
(`sft_run`, `reward_run` in conftest.py; no fit of its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmray.report import write_report

pytestmark = pytest.mark.ray


@pytest.mark.parametrize(
    ("fixture", "kind", "metric"),
    [("sft_run", "sft", "val_exact_match"), ("reward_run", "reward", "val_accuracy")],
)
def test_report_of_a_real_run(request, fixture: str, kind: str, metric: str, tmp_path) -> None:
    result = request.getfixturevalue(fixture)
    checkpoint = Path(result.checkpoint.path)
    report = write_report(checkpoint.parent, tmp_path / "report")
    assert report.kind == kind
    assert report.checkpoint == str(checkpoint)
    # the summary's final value is the one the run reported to Ray Train
    step, value = report.key_metrics[metric].last()
    assert step == result.metrics["step"]
    assert value == pytest.approx(result.metrics[metric])
    assert f"{metric:<16} {value:.4g} at step {step}" in report.summary
    assert (tmp_path / "report" / "curves.png").stat().st_size > 10_000
    assert "loss" in report.key_metrics and len(report.key_metrics["loss"].steps) > 3
