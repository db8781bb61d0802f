"""Exact-match accuracy of greedy answers to held-out instructions.

    python -m fmray.eval.exact_match --model runs/sft-tiny/checkpoint_00000300/hf
    python -m fmray.eval.exact_match --model DIR --source data/instructions/heldout.jsonl --limit 64

Each held-out conversation's last assistant turn is the reference; the turns before it are
rendered with the chat template (the tokenizer's own, else fmray's default) and the model answers
greedily. Answers match after trimming whitespace, case and a final period. Decoding runs a fixed
number of steps per batch, so under ZeRO-3 every rank makes the same number of forward passes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from pydantic import Field
from transformers import PreTrainedTokenizerBase

from fmray.config import Section
from fmray.data.sft_data import Conversation


class EvalSection(Section):
    num_examples: int = Field(128, ge=0)
    """Held-out conversations answered by greedy generation at each evaluation (0: skip)."""
    max_new_tokens: int = Field(24, ge=1)
    """Tokens generated per answer."""
    batch_size: int = Field(32, ge=1)
    """Prompts decoded together per worker."""


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def is_exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def prompt_text(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, template: str
) -> str:
    """The conversation up to its last reply, ending in the assistant's generation prompt."""
    return tokenizer.apply_chat_template(
        conversation[:-1], chat_template=template, tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def greedy_decode(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_new_tokens: int
) -> torch.Tensor:
    """`num_new_tokens` greedy tokens per left-padded row, with a KV cache."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache, step_ids, new_tokens = None, input_ids, []
    for _ in range(num_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
        next_ids = out.logits[:, -1].argmax(-1)
        new_tokens.append(next_ids)
        step_ids = next_ids[:, None]
        position_ids = position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(next_ids), 1))], 1)
    return torch.stack(new_tokens, dim=1)


def greedy_generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Greedy completions of `prompts`, cut at the first end-of-turn or EOS token."""
    from fmray.data.chat_template import stop_token_ids

    stops = set(stop_token_ids(tokenizer))
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            tokenizer(p, add_special_tokens=False)["input_ids"]
            for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        new_tokens = greedy_decode(model, input_ids.to(device), mask.to(device), max_new_tokens)
        for row in new_tokens.tolist():
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return answers


def exact_match_counts(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    template: str,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    num_counted: int | None = None,
) -> tuple[int, int]:
    """(correct, scored) over the first `num_counted` conversations (all by default).

    Conversations past `num_counted` are still decoded: ranks pad their share with them so that
    all ranks run the same forward passes.
    """
    was_training = model.training
    model.eval()
    prompts = [prompt_text(tokenizer, c, template) for c in conversations]
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, device)
    model.train(was_training)
    counted = len(conversations) if num_counted is None else num_counted
    references = [c[-1]["content"] for c in conversations[:counted]]
    correct = sum(is_exact_match(a, r) for a, r in zip(answers, references, strict=False))
    return correct, counted


def distributed_exact_match(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    share: list[Conversation],
    num_counted: int,
    template: str,
    eval_cfg: EvalSection,
    device: torch.device,
) -> float:
    """Exact match over all ranks of a training run: each rank answers its `share` (see
    fmray.train.worker.rank_share), the counts are summed."""
    import torch.distributed as dist

    correct, counted = exact_match_counts(
        model,
        tokenizer,
        share,
        template,
        eval_cfg.max_new_tokens,
        eval_cfg.batch_size,
        device,
        num_counted,
    )
    totals = torch.tensor([correct, counted], device=device, dtype=torch.float64)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return (totals[0] / totals[1].clamp(min=1)).item()


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from fmray.data.chat_template import chat_template_of
    from fmray.data.sft_data import SFTDataSection, load_splits, read_conversations
    from fmray.data.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description="exact-match accuracy by greedy generation")
    parser.add_argument("--model", required=True, help="HF causal-LM directory (with tokenizer)")
    parser.add_argument("--source", default="builtin", help="'builtin' held-out split or a file")
    parser.add_argument("--seed", type=int, default=0, help="world seed of the built-in task")
    parser.add_argument("--limit", type=int, default=0, help="score the first N (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.source == "builtin":
        conversations = load_splits(SFTDataSection(), args.seed)[1]
    else:
        conversations = read_conversations(args.source)
    conversations = conversations[: args.limit or None]
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    correct, total = exact_match_counts(
        model,
        tokenizer,
        conversations,
        chat_template_of(tokenizer),
        args.max_new_tokens,
        32,
        torch.device("cpu"),
    )
    print(json.dumps({"model": args.model, "exact_match": correct / total, "n": total}))


if __name__ == "__main__":
    main()
