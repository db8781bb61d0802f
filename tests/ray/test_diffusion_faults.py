"""Diffusion training whose worker group loses a worker, against the uninterrupted run.

    python -m pytest -q -m faults tests/ray/test_diffusion_faults.py     # make test-faults

The tiny pixel preset (ZeRO-2, EMA, 2 gloo workers) is SIGKILLed once Ray Train has registered
its step-4 checkpoint; the restarted group resumes from it and ends with the uninterrupted
run's losses, EMA and trained weights.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from fmray.config import load_config
from fmray.train.diffusion import DiffusionConfig, run
from tests.ray.test_rl import kill_once_registered

pytestmark = [pytest.mark.ray, pytest.mark.faults]


def overrides(out: Path, name: str) -> list[str]:
    return [
        f"run.name={name}",
        f"run.output_dir={out}",
        "model.preset=tiny",
        "data.num_images=128",
        "data.num_eval_images=8",
        "diffusion.ema_decay=0.9",
        "sample.num_adherence_prompts=4",
        "sample.steps=2",
        "train.micro_batch_size=4",
        "train.max_steps=8",
        "train.lr=1e-3",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every_steps=4",
        "zero.stage=2",
        "scaling.num_workers=2",
        "scaling.max_failures=1",
    ]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_killed_worker_group_resumes_as_the_uninterrupted_run(
    ray_cluster: Any, tmp_path: Path, record_property: Any
) -> None:
    from fmray.checkpoint.format import consolidated_state_dict

    reference = run(load_config(DiffusionConfig, None, overrides(tmp_path, "whole")))
    assert reference.error is None
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_once_registered, args=(tmp_path / "killed", "checkpoint_00000004", killed)
    )
    killer.start()
    result = run(load_config(DiffusionConfig, None, overrides(tmp_path, "killed")))
    killer.join()
    assert killed, "no training worker was found to kill"
    assert result.error is None and result.metrics["step"] == 8
    final = Path(result.checkpoint.path)
    assert json.loads((final / "fmray.json").read_text())["resumed_from_step"] == 4

    expected_losses, got_losses = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert got_losses.keys() == expected_losses.keys()
    for step, loss in expected_losses.items():
        assert got_losses[step] == pytest.approx(loss, abs=1e-6), step
    diff = 0.0
    for load in (
        lambda d: load_file(str(d / "ema.safetensors")),
        lambda d: consolidated_state_dict(d, "denoiser"),
    ):
        expected, got = load(Path(reference.checkpoint.path)), load(final)
        assert expected.keys() == got.keys()
        diff = max(diff, *((expected[k].float() - got[k].float()).abs().max().item() for k in got))
    record_property("diffusion_kill", f"1 worker kill, resumed from step 4, max diff {diff:.1e}")
    assert diff <= 1e-6
