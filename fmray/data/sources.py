"""Text sources: the synthetic corpus or user files (.txt, .jsonl with a text field, .parquet).

A source is 'synthetic' or a path to a file or a folder of such files. Both readers below (local
iteration for tokenizer training, Ray Data for the training pipeline) see the same documents in
the same order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

SUFFIXES = (".txt", ".jsonl", ".parquet")


def source_files(source: str) -> list[Path]:
    """Files of a source, sorted; one clear error if there are none."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    else:
        raise ValueError(f"data.source={source!r}: no such file or folder (or use 'synthetic')")
    bad = [p for p in files if p.suffix not in SUFFIXES]
    if bad or not files:
        raise ValueError(
            f"data.source={source!r}: needs {', '.join(SUFFIXES)} files, found "
            f"{[p.name for p in bad] or 'none'}"
        )
    return files


def iter_file_texts(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        # A .txt file holds one document per non-empty line (as ray.data.read_text reads it).
        for line in path.read_text().splitlines():
            if line.strip():
                yield line
    elif path.suffix == ".jsonl":
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"{path}:{line_no}: no {text_field!r} field (data.text_field)")
            yield str(record[text_field])
    else:
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(f"{path}: no {text_field!r} column (data.text_field)")
        yield from (str(t) for t in table.column(text_field).to_pylist())


def load_texts(source: str, text_field: str, num_documents: int, seed: int) -> list[str]:
    """All documents of a source, in a fixed order."""
    if source == "synthetic":
        from fmray.data.corpus import generate_corpus

        return generate_corpus(num_documents, seed)
    texts: list[str] = []
    for path in source_files(source):
        texts.extend(iter_file_texts(path, text_field))
    if not texts:
        raise ValueError(f"data.source={source!r} holds no documents")
    return texts
