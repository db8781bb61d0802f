"""Streaming detokenization and stop strings (no model, no Ray).

python -m pytest -q tests/unit/test_serve_text.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fmray.serve.detokenize import TextAssembler

TEXT = "Anton has a purple dog. Héllo wörld – 30 minus 8 is 22. 猫 😀 end"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def stream(tokenizer, prompt: str, completion_ids: list[int], stop: list[str] | None = None):
    assembler = TextAssembler(tokenizer, tokenizer(prompt)["input_ids"], stop)
    deltas = [assembler.add(t) for t in completion_ids]
    deltas.append(assembler.flush())
    return deltas, assembler


def test_deltas_concatenate_to_the_full_decode(tokenizer) -> None:
    """Multi-byte characters split across byte-level tokens never leak U+FFFD."""
    ids = tokenizer(TEXT)["input_ids"]
    deltas, assembler = stream(tokenizer, "Prompt:", ids)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT
    assert assembler.text == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_are_not_shown(tokenizer) -> None:
    ids = tokenizer("hello")["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    deltas, _ = stream(tokenizer, "x", ids)
    assert "".join(deltas) == "hello"


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["purple"], "Anton has a "),
        (["dog.", "has"], "Anton "),  # the earliest match wins
        (["nowhere"], TEXT),
        (["😀"], TEXT.split("😀")[0]),
    ],
)
def test_stop_strings_cut_the_text_and_never_stream_partially(tokenizer, stop, expected) -> None:
    ids = tokenizer(TEXT)["input_ids"]
    deltas, assembler = stream(tokenizer, "", ids, stop)
    assert "".join(deltas) == expected
    assert assembler.stopped == (expected != TEXT)
    # Deltas only ever append, so the equality above also proves that no piece of a stop string
    # was streamed before the match: it would still be in the joined text.
    if assembler.stopped:
        assert assembler.add(ids[0]) == ""  # nothing after the stop


def test_whole_response_mode_decodes_once_at_the_end(tokenizer) -> None:
    ids = tokenizer(TEXT)["input_ids"]
    assembler = TextAssembler(tokenizer, [], incremental=False)
    assert [assembler.add(t) for t in ids] == [""] * len(ids)
    assert assembler.flush() == TEXT
    with_stop = TextAssembler(tokenizer, [], stop=["purple"], incremental=False)
    assert with_stop.incremental  # stop strings are matched as text grows
