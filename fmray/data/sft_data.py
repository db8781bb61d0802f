"""SFT data: conversations -> chat-formatted token rows whose labels cover only the replies.

    python -m fmray.data.instructions --out data/instructions    # a source this module reads
    fmray sft --config jobs/sft/tiny.yaml data.source=data/instructions/train.jsonl

A source is 'builtin' (fmray.data.instructions) or a .jsonl / .parquet file or folder whose
records hold either `messages` (a list of {role, content} turns: system / user / assistant) or
`prompt` and `response`. Conversations are rendered with the tokenizer's chat template (fmray's
ChatML default when it has none) and stored as fixed-length rows of `input_ids`, `labels` and
`position_ids` in parquet shards with a global `index` column, like pretraining's blocks.

Labels are -100 everywhere but on assistant replies (their text and end-of-turn token). Without
packing, a row holds one right-padded conversation: causal attention never looks right, so pads
need no attention mask. With packing, conversations are concatenated and `position_ids` restart at
0 for each one, which transformers turns into a block-diagonal attention mask (when the forward
pass gets no attention mask and no KV cache: train with use_cache=False); each
conversation's first label is -100 so no token is predicted across a boundary. A packed row thus
has exactly the per-token losses of its conversations run one by one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field
from transformers import PreTrainedTokenizerBase

from fmray import storage
from fmray.config import Section
from fmray.data.split import in_holdout

IGNORE_INDEX = -100
ROWS_PER_SHARD = 4096
ROLES = ("system", "user", "assistant")
Conversation = list[dict[str, str]]


class SFTDataSection(Section):
    source: str = "builtin"
    """'builtin' (the instruction task) or a .jsonl/.parquet file or folder of conversations."""
    eval_source: str | None = None
    """Held-out conversations (file or folder); unset: the built-in held-out split, or
    data.val_fraction of a file source."""
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    """Fraction of a file source held out for evaluation when data.eval_source is unset."""
    seq_len: int = Field(128, ge=8)
    """Tokens per training row; longer conversations are truncated."""
    packing: bool = False
    """Pack several conversations into each row (masks and positions kept per conversation)."""
    shuffle: bool = True
    """Shuffle conversations (by run.seed) before building rows."""
    num_arithmetic: int = Field(150, ge=0)
    """Arithmetic questions in the built-in task (beside the world questions)."""
    tokenizer: str | None = None
    """HF tokenizer directory; unset: the tokenizer saved with model.path."""
    cache_dir: str | None = None
    """Keep tokenized rows here so later runs (and Tune trials) skip tokenization."""


# ----------------------------------------------------------------------------- reading


def record_to_messages(record: dict[str, Any], where: str) -> Conversation:
    """A `messages` record or a `prompt`/`response` record as a list of turns."""
    if "messages" in record:
        messages = [
            {"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]
        ]
    elif "prompt" in record and "response" in record:
        messages = [
            {"role": "user", "content": str(record["prompt"])},
            {"role": "assistant", "content": str(record["response"])},
        ]
    else:
        raise ValueError(f"{where}: needs a 'messages' field or 'prompt' and 'response' fields")
    bad = [m["role"] for m in messages if m["role"] not in ROLES]
    if bad or not messages or messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: roles must be {', '.join(ROLES)} and the last turn the assistant's "
            f"(got {[m['role'] for m in messages]})"
        )
    return messages


def source_files(source: str) -> list[Path]:
    """The .jsonl / .parquet files of a source file or folder, sorted."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet"))
    if path.is_file() and path.suffix in (".jsonl", ".parquet"):
        return [path]
    raise ValueError(f"data source {source!r}: needs a .jsonl / .parquet file or folder")


def read_records(source: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) of every record of a .jsonl / .parquet file or folder, in file order;
    `where` names the record in errors (file:line or file row n)."""
    records: list[tuple[str, dict[str, Any]]] = []
    for file in source_files(source):
        if file.suffix == ".jsonl":
            for number, text in enumerate(file.read_text().splitlines(), 1):
                if text.strip():
                    try:
                        records.append((f"{file}:{number}", json.loads(text)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{file}:{number}: not a JSON record ({err})") from None
        else:
            rows = pq.read_table(file).to_pylist()
            records.extend((f"{file} row {n}", r) for n, r in enumerate(rows))
    return records


def read_conversations(source: str) -> list[Conversation]:
    """Every conversation of a .jsonl / .parquet file or folder, in file order."""
    conversations = [record_to_messages(record, where) for where, record in read_records(source)]
    if not conversations:
        raise ValueError(f"data source {source!r} holds no conversations")
    return conversations


def load_splits(data: SFTDataSection, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, eval) conversations of the configured source."""
    if data.source == "builtin":
        from fmray.data.instructions import build_task

        task = build_task(seed, data.num_arithmetic)
        train = [e.messages() for e in task.train]
        held = [e.messages() for e in task.heldout]
    else:
        train = read_conversations(data.source)
        held = []
        if data.eval_source is None:
            is_held = [in_holdout(json.dumps(c, sort_keys=True), data.val_fraction) for c in train]
            held = [c for c, h in zip(train, is_held, strict=True) if h]
            train = [c for c, h in zip(train, is_held, strict=True) if not h]
    if data.eval_source is not None:
        held = read_conversations(data.eval_source)
    if not train or not held:
        raise ValueError(
            f"data.source={data.source!r}: {len(train)} train / {len(held)} eval conversations; "
            "both splits need at least one (set data.eval_source or raise data.val_fraction)"
        )
    if data.shuffle:
        random.Random(f"sft-{seed}").shuffle(train)
    return train, held


# ----------------------------------------------------------------------------- tokenizing


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, template: str
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels copy the ids of assistant replies, -100 elsewhere.

    A template with `{% generation %}` blocks marks the reply tokens itself; for any other
    template the replies are found as the text each assistant turn adds to the rendering.
    """
    if "{% generation %}" in template:
        encoded = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    else:
        ids, mask = tokens_in_assistant_spans(tokenizer, messages, template)
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]
    return ids, labels


def tokens_in_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, template: str
) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask of the tokens inside a reply."""

    def render(turns: Conversation, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            turns,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    text = render(messages, False)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:turn], True)
        through_reply = render(messages[: turn + 1], False)
        if not (through_reply.startswith(prompt) and text.startswith(through_reply)):
            raise ValueError(
                "the chat template renders a conversation's beginning differently from the "
                "whole; add {% generation %} blocks to it so reply tokens can be found"
            )
        spans.append((len(prompt), len(through_reply.rstrip())))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(s <= lo and hi <= e for s, e in spans) and hi > lo)
        for lo, hi in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), mask


# ----------------------------------------------------------------------------- rows


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pad_row(row: Row, seq_len: int, pad_id: int) -> Row:
    """Right-pad to seq_len; pads get their own positions and no labels."""
    num_pad = seq_len - len(row.input_ids)
    start = row.position_ids[-1] + 1 if row.position_ids else 0
    return Row(
        row.input_ids + [pad_id] * num_pad,
        row.labels + [IGNORE_INDEX] * num_pad,
        row.position_ids + list(range(start, start + num_pad)),
    )


def build_rows(
    tokenized: list[tuple[list[int], list[int]]], seq_len: int, packing: bool, pad_id: int
) -> tuple[list[Row], int]:
    """Fixed-length rows (padded or greedily packed in order); also the number dropped.

    A conversation is truncated to seq_len; one with no reply token left is dropped.
    """
    rows: list[Row] = []
    current = Row([], [], [])
    dropped = 0
    for ids, labels in tokenized:
        ids, labels = ids[:seq_len], [IGNORE_INDEX] + labels[1:seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        if current.input_ids and (not packing or len(current.input_ids) + len(ids) > seq_len):
            rows.append(pad_row(current, seq_len, pad_id))
            current = Row([], [], [])
        current.input_ids += ids
        current.labels += labels
        current.position_ids += list(range(len(ids)))
    if current.input_ids:
        rows.append(pad_row(current, seq_len, pad_id))
    return rows, dropped


def write_rows(rows: list[Row], out_dir: Path, seq_len: int) -> None:
    """Parquet shards with a global `index` column and fixed-size list columns."""
    names = ("input_ids", "labels", "position_ids")
    write_row_table({n: np.asarray([getattr(r, n) for r in rows]) for n in names}, out_dir, seq_len)


def write_row_table(columns: dict[str, np.ndarray], out_dir: Path, seq_len: int) -> None:
    """Rows of equal-length token columns (each num_rows x seq_len) as parquet shards of
    ROWS_PER_SHARD rows, with a global `index` column (what fmray.data.pipeline reads)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    num_rows = len(next(iter(columns.values())))
    for shard, start in enumerate(range(0, num_rows, ROWS_PER_SHARD)):
        stop = min(start + ROWS_PER_SHARD, num_rows)
        table: dict[str, Any] = {"index": np.arange(start, stop, dtype=np.int64)}
        for name, values in columns.items():
            flat = np.asarray(values[start:stop], dtype=np.int32).reshape(-1)
            table[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), seq_len)
        pq.write_table(pa.table(table), out_dir / f"shard-{shard:05d}.parquet")


# ----------------------------------------------------------------------------- prepared data


@dataclass(frozen=True)
class SFTData:
    """Tokenized train/eval rows in the run's storage, and the eval conversations."""

    root: str
    seq_len: int
    num_train_rows: int
    num_eval_rows: int
    eval_conversations: list[Conversation]


def prepared_data_key(data: Any, seed: int, tokenizer_dir: str, template: str) -> str:
    """Cache key of a chat data section (`source`, `eval_source`, ...): its settings, the seed,
    the source files (path, size, mtime), the tokenizer and the template."""
    digest = hashlib.sha256()
    fields = data.model_dump(exclude={"cache_dir", "tokenizer"})
    digest.update(json.dumps([fields, seed, template], sort_keys=True).encode())
    for source in (data.source, data.eval_source):
        if source and source != "builtin" and Path(source).exists():
            root = Path(source)
            for p in sorted([root] if root.is_file() else root.rglob("*")):
                if p.is_file():
                    stat = p.stat()
                    digest.update(f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for name in sorted(p.name for p in Path(tokenizer_dir).iterdir()):
        digest.update(name.encode() + (Path(tokenizer_dir) / name).read_bytes())
    return digest.hexdigest()[:16]


def build_sft_data(
    data: SFTDataSection, seed: int, tokenizer_dir: str, template: str, cache_root: str
) -> SFTData:
    """Tokenize (Ray Data) and pad or pack once into `cache_root` (local or remote); later calls
    with the same key reuse the rows. Rows are built in a staging folder and published whole:
    concurrent Tune trials building the same key both publish identical rows."""
    from fmray.data.tokenizer import load_tokenizer

    root = storage.join(cache_root, prepared_data_key(data, seed, tokenizer_dir, template))
    if not storage.is_file(storage.join(root, "sft_data.json")):
        train, held = load_splits(data, seed)
        staging = storage.staging_dir(root)
        meta: dict[str, Any] = {"seq_len": data.seq_len}
        pad_id = int(load_tokenizer(tokenizer_dir).pad_token_id)
        splits = tokenize_with_ray_data({"train": train, "eval": held}, tokenizer_dir, template)
        for split, tokenized in splits.items():
            rows, dropped = build_rows(tokenized, data.seq_len, data.packing, pad_id)
            if not rows:
                shutil.rmtree(staging, ignore_errors=True)
                raise ValueError(
                    f"data: no {split} conversation keeps a reply token within "
                    f"data.seq_len={data.seq_len}; raise data.seq_len"
                )
            write_rows(rows, staging / split, data.seq_len)
            meta[f"num_{split}_rows"], meta[f"num_{split}_dropped"] = len(rows), dropped
        (staging / "eval_conversations.json").write_text(json.dumps(held))
        (staging / "sft_data.json").write_text(json.dumps(meta))
        storage.publish_dir(staging, root)
    meta = json.loads(storage.read_text(storage.join(root, "sft_data.json")))
    held = json.loads(storage.read_text(storage.join(root, "eval_conversations.json")))
    return SFTData(root, meta["seq_len"], meta["num_train_rows"], meta["num_eval_rows"], held)


class TokenizeConversations:
    """Ray Data callable: JSON conversations -> (input_ids, labels); tokenizer loaded once."""

    def __init__(self, tokenizer_dir: str, template: str) -> None:
        from fmray.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.template = template

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        pairs = [
            tokenize_conversation(self.tokenizer, json.loads(str(c)), self.template)
            for c in batch["conversation"]
        ]
        return {
            "position": batch["position"],
            "split": batch["split"],
            "input_ids": np.array([p[0] for p in pairs] + [None], dtype=object)[:-1],
            "labels": np.array([p[1] for p in pairs] + [None], dtype=object)[:-1],
        }


def tokenize_with_ray_data(
    splits: dict[str, list[Conversation]], tokenizer_dir: str, template: str
) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Tokenize every split in one Ray Data pass (one tokenizer actor to start, not one per
    split); each split's results come back in its input order."""
    import ray.data

    from fmray.data.pipeline import DATA_TASK_CPUS, iter_in_order, map_on_tokenizer_actor

    items = [
        {"position": i, "split": name, "conversation": json.dumps(c)}
        for name, conversations in splits.items()
        for i, c in enumerate(conversations)
    ]
    tokenized = map_on_tokenizer_actor(
        ray.data.from_items(items),
        TokenizeConversations,
        fn_constructor_args=(tokenizer_dir, template),
        batch_size=256,
        num_cpus=DATA_TASK_CPUS,
    )
    empty: tuple[list[int], list[int]] = ([], [])
    pairs = {name: [empty] * len(conversations) for name, conversations in splits.items()}
    for batch in iter_in_order(tokenized):
        for name, position, ids, labels in zip(
            batch["split"], batch["position"], batch["input_ids"], batch["labels"], strict=True
        ):
            pairs[str(name)][int(position)] = (list(ids), list(labels))
    return pairs


# Columns of a tokenized row that the workers read (pipeline.iter_micro_batches).
ROW_COLUMNS = ("input_ids", "labels", "position_ids")
