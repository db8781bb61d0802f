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


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class PickleWeightsError(ValueError):
    """A model folder whose weights exist only as pickles, which loading could execute."""


def find_servable_dir(path: str | Path) -> str:
    """The HF model folder `path` names (a folder, a checkpoint, or a run's newest export), or
    PickleWeightsError when its weights are pickles only: fmray loads safetensors, never code."""
    from fmray import storage
    from fmray.checkpoint import find_hf_export

    location = find_hf_export(str(path))
    names = storage.list_names(location)
    if not any(name.endswith(".safetensors") for name in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_WEIGHTS))
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise PickleWeightsError(
            f"{path} has {found}: fmray serves safetensors weights only (a pickle can run code "
            "when loaded); convert it once where you trust it, with transformers' "
            "from_pretrained(...).save_pretrained(out_dir)"
        )
    return location


def resolve_model_dir(path: str | Path) -> Path:
    """A local HF model folder for `path` (see find_servable_dir), downloaded once per replica
    from remote storage."""
    from fmray import storage

    return storage.local_copy(find_servable_dir(path))


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
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=pick_dtype(dtype, device), use_safetensors=True
    )
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
