"""Llama-family presets (transformers configs) and model construction.

Under ZeRO-3 the caller first creates `transformers.integrations.HfDeepSpeedConfig`, so both
`from_config` and `from_pretrained` build the model inside `deepspeed.zero.Init`: parameters are
partitioned as they are created and a large model never exists whole on one rank.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

# name -> LlamaConfig fields. vocab_size comes from the tokenizer at build time.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters with a 512-token vocabulary: a real step in milliseconds on CPU.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    # ~5M parameters: CPU-trainable in minutes, big enough to learn the synthetic tasks well.
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    ),
    "llama-125m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    ),
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
}


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
