"""Corpus, tokenizer and packing: deterministic, and no token lost or duplicated."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from fmray.data.corpus import generate_corpus
from fmray.data.pipeline import BlockWriter, Packer, keep_rank_rows, rank_block_indices
from fmray.data.sources import load_texts
from fmray.data.tokenizer import train_tokenizer
from tests.conftest import REPO_ROOT


def test_corpus_is_deterministic_and_seeded() -> None:
    assert generate_corpus(50, seed=1) == generate_corpus(50, seed=1)
    assert generate_corpus(50, seed=1) != generate_corpus(50, seed=2)


def test_corpus_is_far_from_uniform() -> None:
    """Unigram entropy of the words is far below log2(vocabulary): there is structure."""
    words = " ".join(generate_corpus(500)).split()
    counts = Counter(words)
    probs = np.array(list(counts.values())) / len(words)
    entropy = float(-(probs * np.log2(probs)).sum())
    assert entropy < math.log2(len(counts)) - 1.0


def test_tokenizer_is_deterministic_and_loads_with_autotokenizer(tmp_path: Path) -> None:
    texts = generate_corpus(300)
    train_tokenizer(texts, 400, tmp_path / "a")
    train_tokenizer(texts, 400, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_text()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    text = "Alice lives in Paris. 17 plus 25 is 42."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>"


def test_tokenizer_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fmray.cli",
            "tokenizer",
            f"run.output_dir={tmp_path}",
            "data.num_documents=200",
            "data.vocab_size=300",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer" / "tokenizer"))
    assert len(tokenizer) == 300


def test_packer_loses_and_duplicates_nothing() -> None:
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(2, 100, size=rng.integers(1, 40))) for _ in range(200)]
    packer = Packer(seq_len=16, eos_id=0)
    blocks = [block for doc in docs for block in packer.add(doc)]
    stream = [tok for doc in docs for tok in [*doc, 0]]
    assert all(len(b) == 16 for b in blocks)
    assert [t for b in blocks for t in b] + packer.buffer == stream
    assert len(packer.buffer) < 16


def test_block_writer_indexes_rows(tmp_path: Path) -> None:
    writer = BlockWriter(tmp_path, seq_len=4)
    writer.add([[1, 2, 3, 4]] * 3)
    writer.add([[5, 6, 7, 8]] * 2)
    writer.flush()
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path)
    assert table.column("index").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("input_ids").to_pylist()[-1] == [5, 6, 7, 8]


def test_rank_rows_partition_the_global_batches() -> None:
    """Every block below the limit goes to exactly one rank, micro-batch by micro-batch."""
    world, micro, limit = 2, 3, 36
    table = pa.table({"index": np.arange(40, dtype=np.int64)})
    seen: list[int] = []
    for rank in range(world):
        rows = keep_rank_rows(table, rank, world, micro, limit).column("index").to_pylist()
        assert rows == list(rank_block_indices(rank, world, micro, 0, limit))
        seen.extend(rows)
    assert sorted(seen) == list(range(limit))
    # Step s (accum 2) covers blocks [s*G, (s+1)*G), G = micro * accum * world.
    rank0 = list(rank_block_indices(0, world, micro, 12, limit))
    assert rank0[:6] == [12, 13, 14, 18, 19, 20]


def test_sources_read_txt_jsonl_parquet(tmp_path: Path) -> None:
    import json

    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth"]}), tmp_path / "c.parquet")
    assert load_texts(str(tmp_path), "text", 0, 0) == ["first doc", "second doc", "third", "fourth"]


class FakeShard:
    """A rank's shard as Ray Data hands it out: numpy batches with a global `index` column."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def iter_batches(self, batch_size: int, batch_format: str):
        for start in range(0, len(self.indices), batch_size):
            index = np.array(self.indices[start : start + batch_size])
            rows = [np.full(3, i, dtype=np.int32) for i in index]
            yield {"index": index, "input_ids": rows, "labels": rows}


def test_micro_batches_skip_to_start_and_refuse_a_broken_order() -> None:
    from fmray.data.pipeline import iter_micro_batches, rank_block_indices

    # Rank 1 of 2 with micro-batch 2 owns rows 2, 3, 6, 7, 10, 11; resume at global row 4.
    shard = FakeShard([2, 3, 6, 7, 10, 11])
    expected = rank_block_indices(1, 2, 2, 4, 12)
    batches = list(iter_micro_batches(shard, 2, 4, expected, ("input_ids", "labels")))
    assert [b["input_ids"][:, 0].tolist() for b in batches] == [[6, 7], [10, 11]]
    assert batches[0]["labels"].dtype == np.int64

    swapped = FakeShard([2, 3, 7, 6])
    with pytest.raises(RuntimeError, match="data order broke: row 7 arrived, 6 expected"):
        list(iter_micro_batches(swapped, 2, 0, rank_block_indices(1, 2, 2, 0, 8)))
