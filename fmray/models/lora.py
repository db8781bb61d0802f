"""LoRA adapters through peft: only the low-rank matrices train; exports as adapter or merged.

    fmray sft --config jobs/sft/tiny.yaml lora.r=8 lora.alpha=16          # CPU, 2 workers
    python -c "from fmray.models.lora import LoraSection; print(LoraSection())"

A LoRA layer computes W x + (alpha / r) * B A x with W frozen. Its merged weight is therefore
W + (alpha / r) * B A, which `merged_state_dict` computes straight from a (gathered) state dict,
so the merged export needs no second copy of the model and works under every ZeRO stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from fmray.config import Section

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


class LoraSection(Section):
    r: int = Field(8, ge=1)
    """Rank of the adapter matrices A (r x in) and B (out x r)."""
    alpha: float = Field(16.0, gt=0.0)
    """Scale numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input during training."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Names of the nn.Linear modules that get adapters (Llama: q/k/v/o_proj, gate/up/down_proj)."""


def apply_lora(model: torch.nn.Module, lora: LoraSection, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap `model` in a peft LoRA model; only adapter parameters keep requires_grad.

    task_type SEQ_CLS (a reward model) also trains the fresh `score` head: peft keeps a
    trainable copy of it (modules_to_save) beside the frozen original.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # peft names the modules it could not find
        raise ValueError(f"lora.target_modules={lora.target_modules}: {err}") from None
    not_linear = [
        name
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and not isinstance(module.get_base_layer(), torch.nn.Linear)
    ]
    if not_linear:
        raise ValueError(
            f"lora.target_modules={lora.target_modules} reaches non-Linear modules "
            f"({not_linear[:3]}); fmray merges LoRA into nn.Linear weights only"
        )
    return peft_model


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


TRAINED_COPY = f".modules_to_save.{ADAPTER}."
FROZEN_ORIGINAL = ".original_module."


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """HF-named full weights from a peft LoRA state dict: W + scaling * B @ A per adapted layer,
    and the trained copy of each fully trained module (a reward model's head)."""
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_adapter_key(name) or FROZEN_ORIGINAL in name:
            continue
        plain = name.removeprefix(PEFT_PREFIX).replace(TRAINED_COPY, ".")
        if ".base_layer." in name:
            plain = plain.replace(".base_layer.", ".")
            if name.endswith(".base_layer.weight"):
                stem = name.removesuffix(".base_layer.weight")
                lora_a = state[f"{stem}.lora_A.{ADAPTER}.weight"].float()
                lora_b = state[f"{stem}.lora_B.{ADAPTER}.weight"].float()
                tensor = (tensor.float() + scaling * (lora_b @ lora_a)).to(tensor.dtype)
        merged[plain] = tensor
    return merged


def lora_scaling(lora: LoraSection) -> float:
    return lora.alpha / lora.r


def save_adapter(
    peft_model: Any, state: dict[str, torch.Tensor], out_dir: Path, base_model: str | None
) -> None:
    """peft's adapter directory (adapter_config.json + adapter_model.safetensors)."""
    config = peft_model.peft_config[ADAPTER]
    previous = config.base_model_name_or_path
    config.base_model_name_or_path = base_model or previous
    peft_model.save_pretrained(str(out_dir), state_dict=state)
    config.base_model_name_or_path = previous
