"""Where a served model comes from: an HF directory, or the newest HF export of an fmray run.

fmray serve models.tiny.path=runs/pretrain-tiny          # newest checkpoint_*/hf inside
fmray serve models.mine.path=exported/my-model            # any HF causal-LM directory
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fmray.data.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(path: str | Path) -> Path:
    """`path` itself if it holds config.json, else the newest `hf/` export found below it."""
    root = Path(path).expanduser()
    if (root / "config.json").is_file():
        return root
    if (root / "hf" / "config.json").is_file():
        return root / "hf"
    exports = [p.parent for p in root.glob("checkpoint_*/hf/config.json")]
    if not exports:
        raise FileNotFoundError(
            f"{root} holds no HF model (config.json) and no fmray checkpoint with an hf/ export"
        )
    return max(exports, key=_checkpoint_step)


def _checkpoint_step(checkpoint: Path) -> tuple[int, float]:
    meta = checkpoint / "fmray.json"
    step = json.loads(meta.read_text()).get("step", -1) if meta.is_file() else -1
    return int(step), checkpoint.stat().st_mtime


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


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)
