"""Llama-family presets (transformers configs) and model construction.

Under ZeRO-3 the caller first creates `transformers.integrations.HfDeepSpeedConfig`, so both
`from_config` and `from_pretrained` build the model inside `deepspeed.zero.Init`: parameters are
partitioned as they are created and a large model never exists whole on one rank.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from fmray.models.presets import PRESETS


def preset_config(name: str, vocab_size: int, **special_tokens: int | None) -> LlamaConfig:
    """transformers config for a preset; special token ids come from the tokenizer."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is unknown (allowed: {', '.join(PRESETS)})")
    fields = dict(PRESETS[name])
    fields.update(vocab_size=vocab_size, tie_word_embeddings=False, rms_norm_eps=1e-5)
    fields.update({k: v for k, v in special_tokens.items() if v is not None})
    return LlamaConfig(**fields)


def build_causal_lm(
    preset: str | None,
    path: str | None,
    vocab_size: int,
    special_tokens: dict[str, int | None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A fresh preset model (initialised from the current torch seed) or a pretrained one."""
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    assert preset is not None
    config = preset_config(preset, vocab_size, **(special_tokens or {}))
    return AutoModelForCausalLM.from_config(config, dtype=dtype)
