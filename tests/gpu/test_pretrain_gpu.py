"""Pretraining on GPU: nccl, bf16, ZeRO-3 (skipped without CUDA)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_zero3_bf16_on_gpu_learns(tmp_path: Path) -> None:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from fmray.config import load_config
    from fmray.train.pretrain import PretrainConfig, run

    ray.init(num_gpus=torch.cuda.device_count())
    try:
        config = load_config(
            PretrainConfig,
            "jobs/pretrain/small.yaml",
            [
                f"run.output_dir={tmp_path}",
                "train.max_steps=60",
                "train.bf16=true",
                "zero.stage=3",
                "scaling.use_gpu=true",
                f"scaling.num_workers={torch.cuda.device_count()}",
            ],
        )
        result = run(config)
    finally:
        ray.shutdown()
    records = [json.loads(x) for x in (tmp_path / "pretrain-small" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert result.error is None and losses[-1] < losses[0] - 1.0
