"""LR schedule and DeepSpeed config building."""

from __future__ import annotations

import pytest

from fmray.config import TrainSection, ZeroSection
from fmray.distributed.deepspeed_setup import build_ds_config, lr_at


def test_warmup_then_cosine_to_floor() -> None:
    train = TrainSection(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, train) == pytest.approx(0.1)
    assert lr_at(9, train) == pytest.approx(1.0)
    assert lr_at(60, train) == pytest.approx(0.55)
    assert lr_at(110, train) == pytest.approx(0.1)


def test_decay_horizon_extends_the_schedule() -> None:
    short = TrainSection(max_steps=10, lr_decay_steps=20, warmup_steps=2)
    long = TrainSection(max_steps=20, warmup_steps=2)
    assert [lr_at(s, short) for s in range(10)] == [lr_at(s, long) for s in range(10)]


def test_ds_config_geometry_and_offload() -> None:
    train = TrainSection(micro_batch_size=4, grad_accum_steps=3)
    config = build_ds_config(train, ZeroSection(stage=3, offload_optimizer=True), 2, False)
    assert config["train_batch_size"] == 24
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert (
        build_ds_config(train, ZeroSection(stage=0), 1, True)["optimizer"]["params"]["torch_adam"]
        is False
    )
