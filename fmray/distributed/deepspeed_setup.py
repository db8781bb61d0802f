"""DeepSpeed config built in code from the typed config, and engine construction.

Order of what `build_ds_config` applies, and why:
1. batch geometry (micro batch, accumulation, world size) - DeepSpeed checks their product;
2. optimizer - AdamW; torch's implementation on CPU (FusedAdam/cpu_adam JIT-compile ~50 s);
3. precision - bf16 only when asked (fp32 on CPU keeps ZeRO exactly equal to plain PyTorch);
4. ZeRO stage and offload - stage 3 also gathers 16-bit weights so HF export works;
5. clipping and logging.
"""

from __future__ import annotations

import math
import sys
from types import ModuleType
from typing import Any

import torch

from fmray.config import TrainSection, ZeroSection


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, without the MLflow import that DeepSpeed does not need.

    DeepSpeed's autotuner, which fmray never runs, imports MLflow at import time when it is
    installed (fmray installs it for `logging.mlflow`). That is about 1.5 s of CPU in every
    training worker of every fit. While DeepSpeed is imported, `import mlflow` fails for it
    alone; afterwards MLflow imports as before.
    """
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # import mlflow -> ImportError
    try:
        import deepspeed
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def build_ds_config(
    train: TrainSection, zero: ZeroSection, num_workers: int, use_gpu: bool
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * num_workers,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                "torch_adam": not use_gpu,
            },
        },
        "bf16": {"enabled": train.bf16},
        "zero_optimization": {"stage": zero.stage},
        "gradient_clipping": train.grad_clip,
        "steps_per_print": 10**9,  # fmray logs itself
        "wall_clock_breakdown": False,
    }
    zero_opt = config["zero_optimization"]
    if zero.stage == 3:
        zero_opt["stage3_gather_16bit_weights_on_model_save"] = True
    if zero.offload_optimizer:
        zero_opt["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if zero.offload_params:
        zero_opt["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return config


def lr_at(step: int, train: TrainSection) -> float:
    """Multiplier of train.lr at optimizer step `step`: linear warmup, then cosine to the floor."""
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    horizon = train.lr_decay_steps or train.max_steps
    decay_steps = max(1, horizon - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train))


def frozen_ds_config(train_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of an inference-only engine beside a training one (same batch
    geometry and precision): no optimizer or clipping; ZeRO-3 keeps its parameters partitioned
    (with offload if set), while stages 1-2 only shard optimizer states, so it runs as stage 0."""
    zero = train_config["zero_optimization"]
    frozen_zero: dict[str, Any] = {"stage": 3 if zero["stage"] == 3 else 0}
    if zero["stage"] == 3 and "offload_param" in zero:
        frozen_zero["offload_param"] = zero["offload_param"]
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    return {
        **{key: train_config[key] for key in keys},
        "bf16": train_config["bf16"],
        "zero_optimization": frozen_zero,
        "steps_per_print": train_config["steps_per_print"],
        "wall_clock_breakdown": False,
    }
