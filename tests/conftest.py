"""Shared fixtures. Tests run offline, and DeepSpeed's JIT ops build once per machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "fmray" / "torch_extensions")
)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-token BPE tokenizer trained on the synthetic corpus."""
    from fmray.data.corpus import generate_corpus
    from fmray.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(generate_corpus(1000, seed=0), 512, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised (seed 0) tiny preset saved as an HF causal-LM directory."""
    import torch

    from fmray.data.tokenizer import load_tokenizer
    from fmray.models.registry import build_causal_lm

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = build_causal_lm(
        "tiny",
        None,
        vocab_size=len(tokenizer),
        special_tokens={
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
