"""Kinds `reward` and `reward_lora`: a reward model (a causal-LM backbone with a one-label
`score` head) exported as an HF `AutoModelForSequenceClassification` directory: safetensors,
config (num_labels 1, pad token id), tokenizer and chat template. Stock transformers scores with
it outside fmray: the score of a conversation rendered with the chat template is the logit at
its last token.

    fmray export runs/reward-tiny/checkpoint_00000100 exported-rm/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmray.checkpoint.causal_lm import CausalLMExporter
from fmray.checkpoint.lora import HF_DIR, LoraExporter


class RewardExporter(CausalLMExporter):
    kind = "reward"
    auto_class = "AutoModelForSequenceClassification"


class RewardLoraExporter(LoraExporter):
    """LoRA adapters and the trained head on a frozen backbone: adapter/ (peft, with the head
    as modules_to_save) and hf/ (the merged reward model)."""

    kind = "reward_lora"

    def load_base(self, model_dir: Path, ckpt_dir: Path) -> Any:
        from fmray.models.heads import build_reward_model

        config = json.loads((ckpt_dir / HF_DIR / "config.json").read_text())
        return build_reward_model(str(model_dir), int(config["pad_token_id"]))
