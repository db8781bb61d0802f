"""Where a served model comes from: an HF directory, or the newest HF export of an fmray run.

fmray serve models.tiny.path=runs/pretrain-tiny          # newest checkpoint_*/hf inside
fmray serve models.mine.path=exported/my-model            # any HF causal-LM directory
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fmray.data.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(path: str | Path) -> Path:
    """A local HF model folder for `path`: an HF folder, a checkpoint, or a run folder (its
    newest export with weights), local or in remote storage (downloaded once per replica)."""
    from fmray import storage
    from fmray.checkpoint import find_hf_export

    return storage.local_copy(find_hf_export(str(path)))


def pick_device(num_gpus: float) -> torch.device:
    return (
        torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
    )


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(
    path: str | Path, dtype: str = "auto", num_gpus: float = 0.0
) -> tuple[PreTrainedModel, Path]:
    model_dir = resolve_model_dir(path)
    device = pick_device(num_gpus)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=pick_dtype(dtype, device))
    return model.to(device).eval(), model_dir


def load_serving_tokenizer(model_dir: Path, tokenizer: str | None) -> PreTrainedTokenizerBase:
    return load_tokenizer(tokenizer or model_dir)


def context_length(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, limit: int | None
) -> int:
    """The context window: the smallest of max_model_len and the model's own limits."""
    config = model.config.get_text_config()
    candidates = [getattr(config, "max_position_embeddings", None), limit]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 10_000_000:  # HF uses 1e30 for "unset"
        candidates.append(model_max)
    known = [c for c in candidates if isinstance(c, int) and c > 1]
    if not known:
        raise ValueError("the model config has no max_position_embeddings; set max_model_len")
    return min(known)
