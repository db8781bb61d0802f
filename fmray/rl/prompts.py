"""RL prompts: what the policy answers in each rollout, with an optional reference answer.

    fmray grpo --config jobs/grpo/tiny.yaml                            # the built-in task
    fmray grpo --config jobs/grpo/tiny.yaml data.source=prompts.jsonl  # your own prompts

A source is 'builtin' (the instruction task of fmray.data.instructions: its questions, with the
ground-truth answers as references) or a .jsonl / .parquet file or folder of records holding
`prompt` (text) or `messages` (turns ending with the user's; a final assistant turn is taken as
the reference), and optionally `reference` (or `answer`) for rule rewards such as exact match.
The driver renders every prompt with the chat template once and stores the token ids in the run
folder (`rl_prompts.json`); workers pick each step's prompts from a seeded order, so a resumed
run sees exactly the prompts the uninterrupted one would have.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field

from fmray import storage
from fmray.config import Section
from fmray.data.split import in_holdout

Messages = list[dict[str, str]]


class PromptDataSection(Section):
    source: str = "builtin"
    """'builtin' (the instruction task's questions) or a .jsonl/.parquet file or folder."""
    eval_source: str | None = None
    """Held-out prompts; unset: the built-in held-out split, or data.val_fraction of a file."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Fraction of a file source held out for evaluation when data.eval_source is unset."""
    max_prompt_tokens: int = Field(64, ge=1)
    """Longest prompt (with the chat template) allowed; a longer one is an error."""
    num_arithmetic: int = Field(150, ge=0)
    """Arithmetic questions in the built-in task (beside the world questions)."""
    tokenizer: str | None = None
    """HF tokenizer directory; unset: the tokenizer saved with model.path."""


@dataclass(frozen=True)
class Prompt:
    """One prompt as the workers use it."""

    messages: Messages
    """The conversation so far, ending with the user's turn."""
    ids: list[int]
    """Its tokens, rendered with the chat template and the assistant's generation prompt."""
    reference: str | None
    """The reference answer, when the source has one (rule rewards, exact match)."""


def record_to_prompt(record: dict[str, Any], where: str) -> tuple[Messages, str | None]:
    """(messages ending with the user's turn, reference) of one record."""
    reference = record.get("reference", record.get("answer"))
    if "messages" in record:
        messages = [
            {"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]
        ]
        if messages and messages[-1]["role"] == "assistant":
            reference = reference if reference is not None else messages[-1]["content"]
            messages = messages[:-1]
    elif "prompt" in record:
        messages = [{"role": "user", "content": str(record["prompt"])}]
        if reference is None and "response" in record:
            reference = record["response"]
    else:
        raise ValueError(f"{where}: needs a 'prompt' or a 'messages' field")
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt's last turn must be the user's")
    return messages, None if reference is None else str(reference)


def load_prompt_splits(
    data: PromptDataSection, seed: int
) -> tuple[list[tuple[str, Messages, str | None]], list[tuple[str, Messages, str | None]]]:
    """(train, eval) prompts as (where, messages, reference)."""
    from fmray.data.sft_data import read_records

    def read(source: str) -> list[tuple[str, Messages, str | None]]:
        records = read_records(source)
        if not records:
            raise ValueError(f"data source {source!r} holds no prompts")
        return [(where, *record_to_prompt(record, where)) for where, record in records]

    if data.source == "builtin":
        from fmray.data.instructions import build_task

        task = build_task(seed, data.num_arithmetic)
        split = [
            [(f"builtin {e.key}", e.messages()[:1], e.response) for e in examples]
            for examples in (task.train, task.heldout)
        ]
        train, held = split
    else:
        train = read(data.source)
        held = []
        if data.eval_source is None:
            is_held = [
                in_holdout(json.dumps(m, sort_keys=True), data.val_fraction) for _, m, _ in train
            ]
            held = [p for p, h in zip(train, is_held, strict=True) if h]
            train = [p for p, h in zip(train, is_held, strict=True) if not h]
    if data.eval_source is not None:
        held = read(data.eval_source)
    if not train or not held:
        raise ValueError(
            f"data.source={data.source!r}: {len(train)} train / {len(held)} eval prompts; both "
            "splits need at least one (set data.eval_source or raise data.val_fraction)"
        )
    return train, held


def tokenize_prompts(
    tokenizer: Any, prompts: list[tuple[str, Messages, str | None]], max_tokens: int
) -> list[Prompt]:
    from fmray.data.chat_template import render_chat

    out = []
    for where, messages, reference in prompts:
        ids = tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            raise ValueError(
                f"{where}: the prompt takes {len(ids)} tokens with the chat template, over "
                f"data.max_prompt_tokens={max_tokens}"
            )
        out.append(Prompt(messages, list(ids), reference))
    return out


def write_prompts(location: str, train: list[Prompt], held: list[Prompt]) -> None:
    payload = {"train": [asdict(p) for p in train], "eval": [asdict(p) for p in held]}
    storage.write_text(location, json.dumps(payload))


def read_prompts(location: str) -> tuple[list[Prompt], list[Prompt]]:
    payload = json.loads(storage.read_text(location))
    return tuple([Prompt(**p) for p in payload[split]] for split in ("train", "eval"))  # type: ignore[return-value]


def step_prompt_indices(step: int, num_per_step: int, num_prompts: int, seed: int) -> list[int]:
    """Indices of step `step`'s prompts: a seeded shuffle of all prompts per epoch, read in
    order, so every prompt is used once per epoch and a resumed run picks the same ones."""
    orders: dict[int, list[int]] = {}
    indices = []
    for position in range(step * num_per_step, (step + 1) * num_per_step):
        epoch, offset = divmod(position, num_prompts)
        if epoch not in orders:
            orders[epoch] = list(range(num_prompts))
            random.Random(f"rl-prompts-{seed}-{epoch}").shuffle(orders[epoch])
        indices.append(orders[epoch][offset])
    return indices
