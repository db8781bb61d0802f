"""Ray Data pipeline: read -> tokenize (map_batches) -> pack into fixed-length blocks -> shards.

Packing runs once per (data config, tokenizer): documents are tokenized in parallel by Ray Data,
then streamed in order through one packer that joins them with EOS separators and cuts blocks of
`seq_len` tokens with no token lost or duplicated at block boundaries. Blocks are written as
parquet shards (pyarrow) with a global `index` column, so a long run tokenizes once and every
later run (or resume) reads identical blocks.

Workers receive their rows through `ray.train.get_dataset_shard`. The assignment is strided by
global batch: optimizer step s uses blocks [s*G, (s+1)*G) with G = micro * accum * workers, so
the loss curve is that of a single process reading the blocks in order, for any worker count.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmray import storage
from fmray.data.split import in_holdout

ROWS_PER_SHARD = 4096


@dataclass(frozen=True)
class PackedData:
    """A packed train/val split in the run's storage (a local path or a URI)."""

    root: str
    seq_len: int
    num_train_blocks: int
    num_val_blocks: int

    @property
    def train_dir(self) -> str:
        return storage.join(self.root, "train")

    @property
    def val_dir(self) -> str:
        return storage.join(self.root, "val")


class Packer:
    """Joins token streams with EOS and cuts `seq_len` blocks, carrying the remainder over."""

    def __init__(self, seq_len: int, eos_id: int) -> None:
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.buffer: list[int] = []

    def add(self, ids: list[int]) -> list[list[int]]:
        self.buffer.extend(ids)
        self.buffer.append(self.eos_id)
        blocks = []
        while len(self.buffer) >= self.seq_len:
            blocks.append(self.buffer[: self.seq_len])
            del self.buffer[: self.seq_len]
        return blocks


class BlockWriter:
    """Writes blocks to numbered parquet shards with a global index column."""

    def __init__(self, out_dir: Path, seq_len: int) -> None:
        self.out_dir = out_dir
        self.seq_len = seq_len
        self.pending: list[list[int]] = []
        self.num_blocks = 0
        self.num_shards = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, blocks: list[list[int]]) -> None:
        self.pending.extend(blocks)
        if len(self.pending) >= ROWS_PER_SHARD:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        ids = np.asarray(self.pending, dtype=np.int32)
        index = np.arange(self.num_blocks, self.num_blocks + len(ids), dtype=np.int64)
        column = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), self.seq_len)
        table = pa.table({"index": index, "input_ids": column})
        pq.write_table(table, self.out_dir / f"shard-{self.num_shards:05d}.parquet")
        self.num_blocks += len(ids)
        self.num_shards += 1
        self.pending = []


def map_on_tokenizer_actor(dataset: Any, fn: type, **kwargs: Any) -> Any:
    """`dataset.map_batches(fn, ...)` on one actor (the callable class loads its tokenizer once)
    that Ray does not restart.

    Ray Data hands its pool actors their constructor arguments through the object store, where a
    restarted actor cannot count on finding them, and Ray logs an error line for every such actor
    that may restart. A lost tokenizer actor fails the data step instead; the run's next start
    builds the data again. Ray 2.60 takes `max_restarts` only among the remote arguments that it
    deprecates (for removal in 2.64, which will fail here loudly), so that notice is silenced.
    """
    import ray.data

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning
        )
        return dataset.map_batches(
            fn, compute=ray.data.ActorPoolStrategy(size=1), max_restarts=0, **kwargs
        )


class TokenizeBatch:
    """Ray Data callable: text -> token ids (tokenizer loaded once per actor)."""

    def __init__(self, tokenizer_dir: str) -> None:
        from fmray.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        encoded = self.tokenizer(list(batch["text"]), add_special_tokens=False)["input_ids"]
        return {"text": batch["text"], "ids": np.array(encoded + [None], dtype=object)[:-1]}


def read_documents(source: str, text_field: str, num_documents: int, seed: int) -> Any:
    """A Ray Dataset with one `text` column: the synthetic corpus or the source's files."""
    import ray.data

    from fmray.data.sources import load_texts, source_files

    if source == "synthetic":
        texts = load_texts(source, text_field, num_documents, seed)
        return ray.data.from_items([{"text": t} for t in texts])
    parts = []
    for path in source_files(source):
        if path.suffix == ".txt":
            part = ray.data.read_text(str(path), drop_empty_lines=True)
        elif path.suffix == ".jsonl":
            part = ray.data.read_json(str(path), lines=True).select_columns([text_field])
        else:
            part = ray.data.read_parquet(str(path), columns=[text_field])
        if path.suffix != ".txt" and text_field != "text":
            part = part.rename_columns({text_field: "text"})
        parts.append(part)
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def packed_data_key(data_cfg: Any, seed: int, tokenizer_dir: str) -> str:
    """Cache key: data settings, seed and tokenizer contents."""
    digest = hashlib.sha256()
    fields = data_cfg.model_dump(exclude={"cache_dir", "tokenizer", "vocab_size"})
    digest.update(json.dumps([fields, seed], sort_keys=True).encode())
    for name in sorted(p.name for p in Path(tokenizer_dir).iterdir()):
        digest.update(name.encode() + (Path(tokenizer_dir) / name).read_bytes())
    return digest.hexdigest()[:16]


def build_packed_data(data_cfg: Any, seed: int, tokenizer_dir: str, cache_root: str) -> PackedData:
    """Tokenize and pack once into `cache_root` (local or remote); later calls with the same key
    reuse the parquet shards. The shards are built in a staging folder and published whole."""
    from fmray.data.tokenizer import load_tokenizer

    root = storage.join(cache_root, packed_data_key(data_cfg, seed, tokenizer_dir))
    done = storage.join(root, "packed.json")
    if storage.is_file(done):
        meta = json.loads(storage.read_text(done))
        return PackedData(root, meta["seq_len"], meta["num_train_blocks"], meta["num_val_blocks"])
    eos_id = load_tokenizer(tokenizer_dir).eos_token_id
    documents = read_documents(data_cfg.source, data_cfg.text_field, data_cfg.num_documents, seed)
    tokenized = map_on_tokenizer_actor(
        documents, TokenizeBatch, fn_constructor_args=(tokenizer_dir,), batch_size=256
    )
    staging = storage.staging_dir(root)
    writers = {name: BlockWriter(staging / name, data_cfg.seq_len) for name in ("train", "val")}
    packers = {name: Packer(data_cfg.seq_len, eos_id) for name in ("train", "val")}
    for batch in iter_in_order(tokenized):
        for text, ids in zip(batch["text"], batch["ids"], strict=True):
            split = "val" if in_holdout(str(text), data_cfg.val_fraction) else "train"
            writers[split].add(packers[split].add(list(ids)))
    for writer in writers.values():
        writer.flush()
    counts = {name: writer.num_blocks for name, writer in writers.items()}
    if counts["train"] == 0 or counts["val"] == 0:
        raise ValueError(
            f"data: too little text for seq_len={data_cfg.seq_len} (train blocks "
            f"{counts['train']}, val blocks {counts['val']}): add documents or lower data.seq_len"
        )
    meta = {
        "seq_len": data_cfg.seq_len,
        "num_train_blocks": counts["train"],
        "num_val_blocks": counts["val"],
    }
    (staging / "packed.json").write_text(json.dumps(meta))
    storage.publish_dir(staging, root)
    return PackedData(root, data_cfg.seq_len, counts["train"], counts["val"])


def iter_in_order(dataset: Any) -> Iterator[dict[str, np.ndarray]]:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    previous = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield from dataset.iter_batches(batch_size=256, batch_format="numpy")
    finally:
        ctx.execution_options.preserve_order = previous


# Data tasks inside training reserve a sliver of CPU, so they run beside the train workers
# even when those hold every CPU of a small machine; a cap on concurrent tasks keeps a
# fractional CPU from turning into dozens of worker processes. Packed blocks are small, so
# two reading tasks per rank feed even fast GPUs.
DATA_TASK_CPUS = 0.1
DATA_TASK_CONCURRENCY = 2


def keep_rank_rows(
    table: pa.Table, rank: int, num_workers: int, micro_batch_size: int, limit: int
) -> pa.Table:
    """The rows one rank reads: micro-batch chunks strided across ranks, below `limit`."""
    index = table.column("index").to_numpy()
    chunk = (index % (micro_batch_size * num_workers)) // micro_batch_size
    return table.filter(pa.array((chunk == rank) & (index < limit)))


def rank_datasets(
    path: str, num_workers: int, micro_batch_size: int, limit: int, prefix: str
) -> dict[str, Any]:
    """One dataset per rank: `{prefix}_rank{r}` holds the rows rank r reads, in order."""
    import ray.data

    # Ray Data's V2 parquet path (file listing + ReadFilesParquetV2 tasks) took 40-90 s per
    # small rank dataset here, starting dozens of worker processes; the V1 reader takes ~2 s.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    # One read task per shard file: Ray Data would otherwise split each small file into blocks
    # for parallelism (SplitBlocks), which keeps the row filter below from fusing into the read
    # and starts twice the worker processes, seconds each, before a fit's first step.
    num_files = sum(name.endswith(".parquet") for name in storage.list_names(path))
    base = ray.data.read_parquet(
        path,
        num_cpus=DATA_TASK_CPUS,
        concurrency=DATA_TASK_CONCURRENCY,
        override_num_blocks=max(num_files, 1),
    )
    return {
        f"{prefix}_rank{rank}": base.map_batches(
            keep_rank_rows,
            fn_kwargs={
                "rank": rank,
                "num_workers": num_workers,
                "micro_batch_size": micro_batch_size,
                "limit": limit,
            },
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=DATA_TASK_CPUS,
            compute=ray.data.TaskPoolStrategy(size=DATA_TASK_CONCURRENCY),
        )
        for rank in range(num_workers)
    }


def iter_micro_batches(
    shard: Any,
    micro_batch_size: int,
    start_index: int,
    expected: Iterator[int],
    columns: tuple[str, ...] = ("input_ids",),
) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches (int64 `columns`) of one epoch of a rank's shard, from global row
    `start_index` on.

    `expected` yields the global row indices this rank must see; a mismatch means the data
    order broke, which would silently break exact resume, so it raises.
    """
    for batch in shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy"):
        index = batch["index"]
        if index[0] < start_index:
            continue
        for got in index:
            want = next(expected)
            if got != want:
                raise RuntimeError(f"data order broke: row {got} arrived, {want} expected")
        yield {name: np.stack(batch[name]).astype(np.int64) for name in columns}


def rank_block_indices(
    rank: int, num_workers: int, micro: int, start: int, limit: int
) -> Iterator[int]:
    """Global block indices rank `rank` reads from `start` (a multiple of micro*workers) on."""
    for index in range(start, limit):
        if (index % (micro * num_workers)) // micro == rank:
            yield index


# Rank shards up to this size (int64 rows) are kept in memory after their first read.
IN_MEMORY_SHARD_BYTES = 256 * 2**20


def iter_train_batches(
    shard: Any,
    rank: int,
    num_workers: int,
    micro: int,
    start_step: int,
    global_batch: int,
    num_rows: int,
    seq_len: int,
    columns: tuple[str, ...],
) -> Iterator[dict[str, np.ndarray]]:
    """This rank's micro-batches from optimizer step `start_step` on, epoch after epoch.

    Step s reads rows [s*G, (s+1)*G) of the epoch (G = global batch), so any resume point and
    any worker count see the rows a single process would. A shard that fits in
    IN_MEMORY_SHARD_BYTES is read once and replayed: small sets are seen for many epochs, and
    restarting a Ray Data read every few steps would cost more than the steps it feeds.
    """
    steps_per_epoch = num_rows // global_batch
    limit = steps_per_epoch * global_batch
    step_in_epoch = start_step % steps_per_epoch
    if (limit // num_workers) * seq_len * len(columns) * 8 <= IN_MEMORY_SHARD_BYTES:
        expected = rank_block_indices(rank, num_workers, micro, 0, limit)
        epoch = list(iter_micro_batches(shard, micro, 0, expected, columns))
        index = step_in_epoch * (global_batch // (micro * num_workers))
        while True:
            yield epoch[index % len(epoch)]
            index += 1
    while True:
        start = step_in_epoch * global_batch
        expected = rank_block_indices(rank, num_workers, micro, start, limit)
        yield from iter_micro_batches(shard, micro, start, expected, columns)
        step_in_epoch = 0
