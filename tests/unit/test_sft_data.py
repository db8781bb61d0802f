"""SFT data: built-in task split, reply-only labels, packing equal to one-by-one, file formats."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fmray.data.chat_template import DEFAULT_CHAT_TEMPLATE
from fmray.data.corpus import build_world
from fmray.data.instructions import build_task
from fmray.data.sft_data import (
    IGNORE_INDEX,
    SFTDataSection,
    build_rows,
    load_splits,
    read_conversations,
    tokenize_conversation,
)
from fmray.data.tokenizer import load_tokenizer
from fmray.eval.loss import masked_loss_sum

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where does Alice live?"},
    {"role": "assistant", "content": "Alice lives in Paris."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
]
# The same ChatML format without {% generation %} markers: replies found by rendering prefixes.
PLAIN_TEMPLATE = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace(
    "{% endgeneration %}", ""
)


def test_builtin_task_holds_out_whole_facts_with_true_answers() -> None:
    task = build_task(seed=0)
    assert task == build_task(seed=0)
    train_keys = {e.key for e in task.train}
    assert train_keys.isdisjoint(e.key for e in task.heldout)
    assert 0.1 < len(task.heldout) / (len(task.train) + len(task.heldout)) < 0.3
    people = {p.name: p for p in build_world(0)}
    for example in task.train + task.heldout:
        name, _, fact = example.key.partition(":")
        if name in people and fact == "city":
            assert example.response == f"{name} lives in {people[name].city}."
        if example.prompt.startswith("What is") and " plus " in example.prompt:
            a, b = example.prompt.removeprefix("What is ").rstrip("?").split(" plus ")
            assert example.response == f"{a} plus {b} is {int(a) + int(b)}."


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, PLAIN_TEMPLATE])
def test_labels_cover_exactly_the_replies(tiny_tokenizer_dir: Path, template: str) -> None:
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION, template)
    assert len(ids) == len(labels)
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(
        CONVERSATION, chat_template=template, tokenize=False
    )
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == "Alice lives in Paris.<|im_end|>2 plus 3 is 5.<|im_end|>"
    # Every labelled position copies its input token; everything else (prompts) is masked.
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels, strict=True))
    prompt_tokens = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    assert "Where does Alice live?" in tokenizer.decode(prompt_tokens)


def test_both_reply_finders_agree(tiny_tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    marked = tokenize_conversation(tokenizer, CONVERSATION, DEFAULT_CHAT_TEMPLATE)
    assert marked == tokenize_conversation(tokenizer, CONVERSATION, PLAIN_TEMPLATE)


def test_loss_is_cross_entropy_of_reply_tokens_only(
    tiny_tokenizer_dir: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION, DEFAULT_CHAT_TEMPLATE)
    input_ids, label_ids = torch.tensor([ids]), torch.tensor([labels])
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=label_ids)
    # Closed form: -log p(token_t | tokens_<t), averaged over reply positions t only.
    log_probs = torch.log_softmax(out.logits[0].double(), dim=-1)
    reply_positions = [t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    expected = -sum(log_probs[t - 1, ids[t]] for t in reply_positions) / len(reply_positions)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    total, count = masked_loss_sum(out.logits, label_ids)
    assert count == len(reply_positions)
    assert total.item() / count == pytest.approx(expected.item(), rel=1e-5)
    # Changing a prompt token's label to anything masked changes nothing; a reply token's does.
    reply_label = label_ids.clone()
    reply_label[0, reply_positions[0]] = IGNORE_INDEX
    assert masked_loss_sum(out.logits, reply_label)[1] == count - 1


def test_packed_row_equals_conversations_one_by_one(
    tiny_tokenizer_dir: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    conversations = [e.messages() for e in build_task(seed=0).train[:3]]
    tokenized = [tokenize_conversation(tokenizer, c, DEFAULT_CHAT_TEMPLATE) for c in conversations]
    rows, dropped = build_rows(tokenized, 128, packing=True, pad_id=tokenizer.pad_token_id)
    assert len(rows) == 1 and dropped == 0
    row = rows[0]
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([row.input_ids]),
            position_ids=torch.tensor([row.position_ids]),
            use_cache=False,  # as in training: with a cache, transformers ignores the packing
        ).logits[0]
        offset = 0
        total = torch.zeros((), dtype=torch.float32)
        for ids, labels in tokenized:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[offset : offset + len(ids)], alone, atol=1e-4, rtol=0)
            assert row.labels[offset] == IGNORE_INDEX  # nothing predicted across a boundary
            assert row.labels[offset + 1 : offset + len(ids)] == labels[1:]
            total += masked_loss_sum(alone[None], torch.tensor([labels]))[0]
            offset += len(ids)
        packed_total = masked_loss_sum(packed[None], torch.tensor([row.labels]))[0]
    assert packed_total.item() == pytest.approx(total.item(), rel=1e-4)
    assert all(label == IGNORE_INDEX for label in row.labels[offset:])  # padding


def test_unpacked_rows_and_truncation(tiny_tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    short = tokenize_conversation(tokenizer, CONVERSATION[1:3], DEFAULT_CHAT_TEMPLATE)
    rows, dropped = build_rows([short, short], 64, packing=False, pad_id=0)
    assert len(rows) == 2 and dropped == 0
    assert all(len(r.input_ids) == len(r.labels) == len(r.position_ids) == 64 for r in rows)
    assert rows[0].position_ids == list(range(64))
    # Cut before the reply begins: nothing left to learn, so the conversation is dropped.
    prompt_len = short[1].index(next(t for t in short[1] if t != IGNORE_INDEX))
    rows, dropped = build_rows([short], prompt_len, packing=False, pad_id=0)
    assert rows == [] and dropped == 1


def test_reads_messages_and_prompt_response_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(
        json.dumps({"messages": CONVERSATION})
        + "\n\n"
        + json.dumps({"prompt": "Hi?", "response": "Hello."})
        + "\n"
    )
    table = pa.table({"prompt": ["What is 1 plus 1?"], "response": ["1 plus 1 is 2."]})
    pq.write_table(table, tmp_path / "more.parquet")
    conversations = read_conversations(str(tmp_path))
    assert conversations[0] == CONVERSATION
    assert conversations[1][-1] == {"role": "assistant", "content": "Hello."}
    assert conversations[2][0] == {"role": "user", "content": "What is 1 plus 1?"}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"text": "no chat here"}, "bad.jsonl:2: needs a 'messages' field or 'prompt' and"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "the last turn the assistant's"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "roles must be system, user"),
    ],
)
def test_bad_records_fail_with_one_line(tmp_path: Path, record: dict, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(record))
    with pytest.raises(ValueError) as err:
        read_conversations(str(path))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_file_source_holds_out_a_stable_fraction(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(400)]
    path.write_text("\n".join(lines))
    data = SFTDataSection(source=str(path), val_fraction=0.2)
    train, held = load_splits(data, seed=0)
    assert len(train) + len(held) == 400 and 40 < len(held) < 120
    assert {c[0]["content"] for c in held} == {c[0]["content"] for c in load_splits(data, 1)[1]}
