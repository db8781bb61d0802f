"""The chat models the Ray tests share: a tiny model that knows the synthetic world (plain
PyTorch, no Ray) and the SFT configuration whose fit (one per session, `sft_run` in conftest.py)
the SFT, reward-model and DPO tests all use."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from fmray.config import validate_config
from fmray.data.chat_template import DEFAULT_CHAT_TEMPLATE
from fmray.data.sft_data import SFTDataSection, load_splits
from fmray.data.tokenizer import load_tokenizer
from fmray.eval.exact_match import exact_match_counts
from fmray.train import sft


def pretrain_in_process(tokenizer_dir: Path, out_dir: Path, steps: int = 200) -> Path:
    """A tiny model that knows the synthetic world, as a plain HF directory (a "user's model").

    Plain PyTorch on documents of facts about the world's people (the corpus's own sentences)
    and a sum: the same knowledge as `fmray pretrain` on the full corpus, in a fraction of the
    steps (about 90% of the facts are completed correctly after 200 steps).
    """
    from fmray.config import TrainSection
    from fmray.data.corpus import arithmetic_sentence, build_world, person_sentences
    from fmray.distributed.deepspeed_setup import lr_at
    from fmray.models.registry import build_causal_lm

    tokenizer = load_tokenizer(tokenizer_dir)
    world, rng = build_world(seed=0), random.Random(0)
    stream: list[int] = []
    for _ in range(3000):
        facts = [fact for person in rng.sample(world, 2) for fact in person_sentences(person)]
        rng.shuffle(facts)
        text = " ".join([*facts, arithmetic_sentence(rng)])
        stream += [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    blocks = torch.tensor(stream[: len(stream) // 64 * 64]).view(-1, 64)
    torch.manual_seed(0)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = build_causal_lm("tiny", None, len(tokenizer), special)
    schedule = TrainSection(lr=3e-3, max_steps=steps, warmup_steps=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, schedule))
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = blocks[torch.randint(0, len(blocks), (16,), generator=order)]
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# The SFT fixture's early checkpoint: after 40 of 120 steps the model answers a third of the
# training questions about people and 2 of the 67 held-out questions, mostly well-formed
# sentences about the wrong person ("How old is Tara?" -> "Carl is 33 years old."); at 120 steps
# held-out exact match is 0.27.
SFT_EARLY_STEP = 40


def sft_config(model_path: Path, out: Path, **sections: dict[str, Any]) -> sft.SFTConfig:
    tree: dict[str, Any] = {
        "run": {"name": "sft", "output_dir": str(out)},
        "model": {"path": str(model_path)},
        "data": {"source": "builtin", "seq_len": 128, "packing": True},
        "train": {"max_steps": 120, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 10},
        "eval": {"num_examples": 200, "max_new_tokens": 16},
        "zero": {"stage": 2},
        "scaling": {"num_workers": 2},
        "logging": {"tensorboard": False, "progress": True},
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values} if values is not None else None
    return validate_config(sft.SFTConfig, tree)


def heldout_accuracy(model_dir: Path) -> float:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    heldout = load_splits(SFTDataSection(), seed=0)[1]
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    correct, total = exact_match_counts(
        model, tokenizer, heldout, template, 16, 64, torch.device("cpu")
    )
    return correct / total


# 134 held-out pairs: 8 eval micro-batches x 8 pairs x 2 workers cover the first 128.
ALIGN_EVAL = {"eval_batches": 8}


def align_tree(model_dir: Path, out: Path, name: str, **sections: dict[str, Any]) -> dict:
    """A reward-model or DPO config tree from `model_dir` (2 workers, ZeRO-3); `sections`
    update its sections."""
    tree: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(out)},
        "model": {"path": str(model_dir)},
        "data": {"source": "builtin", "seq_len": 64},
        "train": {"micro_batch_size": 8, "warmup_steps": 5, "log_every": 5, **ALIGN_EVAL},
        "zero": {"stage": 3},
        "scaling": {"num_workers": 2},
        "logging": {"tensorboard": False},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return tree
