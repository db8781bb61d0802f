"""Causal-LM backbones with a scalar head: reward models (and PPO's critic).

    python -c "from fmray.models.heads import build_reward_model; help(build_reward_model)"

A reward model is transformers' `AutoModelForSequenceClassification` with one label: the
backbone of a causal LM and a linear `score` head read at each row's last non-pad token. Built
from an SFT export (a causal LM: the head starts fresh, initialised from the current torch seed)
or from a reward-model export (the head is kept), it saves as a directory that stock
transformers loads and scores with, outside fmray.
"""

from __future__ import annotations

from typing import Any

import torch


def build_reward_model(path: str, pad_token_id: int, dtype: torch.dtype = torch.float32) -> Any:
    """A one-label sequence-classification model over the backbone at `path`.

    The pad token id tells the head where each right-padded row ends.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, pad_token_id=pad_token_id, dtype=dtype
    )
    model.config.pad_token_id = pad_token_id
    return model
