"""Preference data: (prompt, chosen, rejected) records -> paired token rows for RM and DPO.

    python -m fmray.data.preferences --out data/preferences      # a source this module reads
    fmray reward --config jobs/reward/tiny.yaml data.source=data/preferences/train.jsonl

A source is 'builtin' (fmray.data.preferences) or a .jsonl / .parquet file or folder of records
in the TRL / OpenRLHF formats:
    {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "2 plus 3 is 6."}
    {"messages": [{"role": "user", "content": ...}], "chosen": ..., "rejected": ...}
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", "content": ...}], ...}
    {"chosen": [<turns>..., {"role": "assistant", ...}], "rejected": [<same turns>..., {...}]}
A `messages` (or list) prompt is a conversation that ends before the reply; it goes through the
same chat template as `fmray sft`. Replies are strings or lists of turns ending in the
assistant's.

Each pair becomes one row with `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`,
`rejected_labels` (seq_len tokens each, right-padded; labels are -100 except on the reply and its
end-of-turn token), in parquet shards with a global `index` column as SFT's rows. A bad record
(missing field, empty reply, a prompt that leaves no room for the reply) fails with one line
naming the record and the field, on the driver before Ray starts. Replies longer than the room
left are truncated, and counted.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from fmray import storage
from fmray.config import Section
from fmray.data.sft_data import (
    IGNORE_INDEX,
    Conversation,
    prepared_data_key,
    read_records,
    record_to_messages,
    tokenize_conversation,
    write_row_table,
)
from fmray.data.split import in_holdout

SIDES = ("chosen", "rejected")
# Columns of a paired row that the workers read (pipeline.iter_micro_batches).
PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


class PreferenceDataSection(Section):
    source: str = "builtin"
    """'builtin' (the instruction task's pairs) or a .jsonl/.parquet file or folder of
    {prompt | messages, chosen, rejected} records."""
    eval_source: str | None = None
    """Held-out pairs (file or folder); unset: the built-in held-out split, or
    data.val_fraction of a file source."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Fraction of a file source held out for evaluation when data.eval_source is unset."""
    seq_len: int = Field(64, ge=8)
    """Tokens per prompt + reply row; longer replies are truncated, a longer prompt is an error."""
    shuffle: bool = True
    """Shuffle training pairs (by run.seed) before building rows."""
    num_arithmetic: int = Field(150, ge=0)
    """Arithmetic questions in the built-in task (beside the world questions)."""
    tokenizer: str | None = None
    """HF tokenizer directory; unset: the tokenizer saved with model.path."""
    cache_dir: str | None = None
    """Keep tokenized rows here so later runs (and Tune trials) skip tokenization."""


@dataclass(frozen=True)
class Pair:
    prompt: Conversation
    """The conversation before the reply (ends with a user turn)."""
    chosen: str
    rejected: str
    where: str
    """The record in error messages (file:line, file row n, builtin pair n)."""
    prompt_field: str = "prompt"

    def conversation(self, side: str) -> Conversation:
        return [*self.prompt, {"role": "assistant", "content": getattr(self, side)}]


# ----------------------------------------------------------------------------- reading


def reply_text(value: Any, where: str, field: str) -> tuple[str, Conversation]:
    """(reply, turns before it) of a chosen / rejected value: a string or a list of turns."""
    if isinstance(value, str):
        turns: Conversation = []
        reply = value
    elif isinstance(value, list) and value:
        try:
            turns = record_to_messages({"messages": value}, f"{where}: field {field!r}")
        except (KeyError, TypeError):
            raise ValueError(
                f"{where}: field {field!r} must be a string or a list of "
                "{role, content} turns ending in the assistant's"
            ) from None
        reply, turns = turns[-1]["content"], turns[:-1]
    else:
        raise ValueError(f"{where}: field {field!r} must be a non-empty string or list of turns")
    if not reply.strip():
        raise ValueError(f"{where}: field {field!r} is an empty reply")
    return reply, turns


def record_to_pair(record: Any, where: str) -> Pair:
    """A preference record (see the module doc) as a Pair; one-line errors name the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be an object with prompt, chosen, rejected")
    for field in SIDES:
        if field not in record or record[field] is None:
            raise ValueError(f"{where}: missing field {field!r}")
    chosen, chosen_turns = reply_text(record["chosen"], where, "chosen")
    rejected, rejected_turns = reply_text(record["rejected"], where, "rejected")
    field = "messages" if "messages" in record else "prompt"
    raw = record.get(field)
    if raw is None:  # implicit prompt: the turns both replies share
        if not chosen_turns or chosen_turns != rejected_turns:
            raise ValueError(
                f"{where}: missing field 'prompt' (or 'messages', or chosen/rejected "
                "conversations sharing their turns before the reply)"
            )
        prompt = chosen_turns
    elif isinstance(raw, str):
        if not raw.strip():
            raise ValueError(f"{where}: field {field!r} is empty")
        prompt = [{"role": "user", "content": raw}]
    else:
        try:
            prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in raw]
        except (KeyError, TypeError):
            raise ValueError(
                f"{where}: field {field!r} must be a string or a list of {{role, content}} turns"
            ) from None
        if not prompt or prompt[-1]["role"] == "assistant":
            raise ValueError(f"{where}: field {field!r} must end before the reply (a user turn)")
    return Pair(prompt, chosen, rejected, where, field)


def read_pairs(source: str) -> list[Pair]:
    pairs = [record_to_pair(record, where) for where, record in read_records(source)]
    if not pairs:
        raise ValueError(f"data source {source!r} holds no preference pairs")
    return pairs


def builtin_pairs(seed: int, num_arithmetic: int) -> tuple[list[Pair], list[Pair]]:
    from fmray.data.preferences import build_pairs

    splits = build_pairs(seed, num_arithmetic)
    return tuple(  # type: ignore[return-value]
        [record_to_pair(pair.record(), f"builtin {name} pair {n}") for n, pair in enumerate(pairs)]
        for name, pairs in zip(("train", "held-out"), splits, strict=True)
    )


def load_pair_splits(data: PreferenceDataSection, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) pairs of the configured source."""
    if data.source == "builtin":
        train, held = builtin_pairs(seed, data.num_arithmetic)
    else:
        train, held = read_pairs(data.source), []
        if data.eval_source is None:
            keys = [json.dumps([p.prompt, p.chosen, p.rejected]) for p in train]
            is_held = [in_holdout(key, data.val_fraction) for key in keys]
            held = [p for p, h in zip(train, is_held, strict=True) if h]
            train = [p for p, h in zip(train, is_held, strict=True) if not h]
    if data.eval_source is not None:
        held = read_pairs(data.eval_source)
    if not train or not held:
        raise ValueError(
            f"data.source={data.source!r}: {len(train)} train / {len(held)} eval pairs; both "
            "splits need at least one (set data.eval_source or raise data.val_fraction)"
        )
    if data.shuffle:
        random.Random(f"preferences-{seed}").shuffle(train)
    return train, held


# ----------------------------------------------------------------------------- tokenizing


def tokenize_pair(
    tokenizer: Any, pair: Pair, template: str, seq_len: int
) -> tuple[dict[str, list[int]], bool]:
    """The pair's four padded columns, and whether a reply was truncated to fit seq_len."""
    columns: dict[str, list[int]] = {}
    truncated = False
    pad_id = int(tokenizer.pad_token_id)
    for side in SIDES:
        ids, labels = tokenize_conversation(tokenizer, pair.conversation(side), template)
        prompt_len = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        if prompt_len >= seq_len:
            raise ValueError(
                f"{pair.where}: field {pair.prompt_field!r} takes {prompt_len} tokens with the "
                f"chat template, leaving no room for the reply in data.seq_len={seq_len}"
            )
        truncated = truncated or len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        num_pad = seq_len - len(ids)
        columns[f"{side}_input_ids"] = ids + [pad_id] * num_pad
        columns[f"{side}_labels"] = labels + [IGNORE_INDEX] * num_pad
    return columns, truncated


@dataclass(frozen=True)
class PreferenceData:
    """Paired train/eval rows in the run's storage, and the eval conversations."""

    root: str
    seq_len: int
    num_train_rows: int
    num_eval_rows: int
    num_truncated: int
    eval_conversations: list[Conversation]
    """Held-out prompts with their chosen reply (exact match of greedy answers)."""


def build_preference_data(
    data: PreferenceDataSection, seed: int, tokenizer_dir: str, template: str, cache_root: str
) -> PreferenceData:
    """Validate and tokenize every pair once into `cache_root` (local or remote), in this
    process (no Ray needed, so bad records fail before Ray starts); later calls with the same
    key reuse the rows. Built in a staging folder and published whole."""
    from fmray.data.tokenizer import load_tokenizer

    root = storage.join(cache_root, prepared_data_key(data, seed, tokenizer_dir, template))
    if not storage.is_file(storage.join(root, "preference_data.json")):
        train, held = load_pair_splits(data, seed)
        tokenizer = load_tokenizer(tokenizer_dir)
        meta: dict[str, Any] = {"seq_len": data.seq_len, "num_truncated": 0}
        tokenized = {}
        for split, pairs in (("train", train), ("eval", held)):
            rows = [tokenize_pair(tokenizer, pair, template, data.seq_len) for pair in pairs]
            tokenized[split] = {
                name: np.asarray([r[0][name] for r in rows]) for name in PAIR_COLUMNS
            }
            meta[f"num_{split}_rows"] = len(rows)
            meta["num_truncated"] += sum(r[1] for r in rows)
        staging = storage.staging_dir(root)
        try:
            for split, columns in tokenized.items():
                write_row_table(columns, staging / split, data.seq_len)
            conversations = unique([pair.conversation("chosen") for pair in held])
            (staging / "eval_conversations.json").write_text(json.dumps(conversations))
            (staging / "preference_data.json").write_text(json.dumps(meta))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        storage.publish_dir(staging, root)
    meta = json.loads(storage.read_text(storage.join(root, "preference_data.json")))
    held_conversations = json.loads(
        storage.read_text(storage.join(root, "eval_conversations.json"))
    )
    return PreferenceData(
        root,
        meta["seq_len"],
        meta["num_train_rows"],
        meta["num_eval_rows"],
        meta["num_truncated"],
        held_conversations,
    )


def unique(conversations: list[Conversation]) -> list[Conversation]:
    """Conversations in order, each once (a prompt's chosen reply recurs in several pairs)."""
    seen: set[str] = set()
    kept = []
    for conversation in conversations:
        key = json.dumps(conversation)
        if key not in seen:
            seen.add(key)
            kept.append(conversation)
    return kept
