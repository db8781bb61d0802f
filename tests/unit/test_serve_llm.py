"""One model's OpenAI layer in-process: prompts, choices, stops, streams, errors (no Ray).

python -m pytest -q tests/unit/test_serve_llm.py
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fmray.data.chat_template import render_chat
from fmray.serve.config import EngineSection
from fmray.serve.errors import APIError
from fmray.serve.llm import LLMServer
from fmray.serve.schemas import ChatCompletionRequest, CompletionRequest

PROMPT = "Hugo lives in Rome. Hugo has a blue"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[LLMServer]:
    torch.set_num_threads(1)
    server = LLMServer.load("tiny", str(tiny_model_dir), engine=EngineSection(max_waiting=2))
    server.start()
    yield server
    server.shutdown()


def run(coro):
    return asyncio.run(coro)


def reference_text(server: LLMServer, prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
    model, tokenizer = server.engine.model, server.tokenizer
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    new = out[0, len(prompt_ids) :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def events(chunks: list[str]) -> list[dict | str]:
    assert all(c.startswith("data: ") and c.endswith("\n\n") for c in chunks)
    bodies = [c[len("data: ") : -2] for c in chunks]
    return [b if b == "[DONE]" else json.loads(b) for b in bodies]


async def gather_stream(stream) -> list[str]:
    return [chunk async for chunk in stream]


def test_greedy_completion_equals_generate(server: LLMServer) -> None:
    ids = server.tokenizer(PROMPT)["input_ids"]
    want, num_tokens = reference_text(server, ids, 20)
    body = run(
        server.completion(
            CompletionRequest(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
        )
    )
    choice = body["choices"][0]
    assert choice["text"] == want
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": num_tokens,
        "total_tokens": len(ids) + num_tokens,
    }
    assert choice["finish_reason"] == ("length" if num_tokens == 20 else "stop")


def test_choices_and_seeds(server: LLMServer) -> None:
    request = CompletionRequest(
        model="tiny", prompt=["Anton", "Emma is"], n=2, max_tokens=8, seed=5
    )
    first = run(server.completion(request))
    again = run(server.completion(request))
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert texts == [c["text"] for c in again["choices"]]  # same seed, same choices
    assert texts[0] != texts[1]  # choice i samples with seed + i
    num_prompt = sum(len(server.tokenizer(p)["input_ids"]) for p in ("Anton", "Emma is"))
    assert first["usage"]["prompt_tokens"] == num_prompt  # once per prompt, not per choice


def test_stop_string_and_stream_match_the_whole_response(server: LLMServer) -> None:
    ids = server.tokenizer(PROMPT)["input_ids"]
    full, _ = reference_text(server, ids, 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    request = CompletionRequest(
        model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop
    )
    whole = run(server.completion(request))["choices"][0]
    assert whole["text"] == full[: full.index(stop)] and whole["finish_reason"] == "stop"
    options = {"stream": True, "stream_options": {"include_usage": True}}
    streamed = CompletionRequest.model_validate({**request.model_dump(), **options})
    parsed = events(run(gather_stream(server.completion_stream(streamed))))
    assert parsed[-1] == "[DONE]" and parsed[-2]["choices"] == []
    assert parsed[-2]["usage"]["prompt_tokens"] == len(ids)
    chunks = parsed[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert len({c["id"] for c in chunks}) == 1


def test_chat_uses_the_template_and_streams_openai_chunks(server: LLMServer) -> None:
    messages = [{"role": "user", "content": "Where does Hugo live?"}]
    prompt = render_chat(server.tokenizer, messages)
    ids = server.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    want, _ = reference_text(server, ids, 12)
    request = ChatCompletionRequest(model="tiny", messages=messages, max_tokens=12, temperature=0)
    body = run(server.chat(request))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert body["usage"]["prompt_tokens"] == len(ids)
    streamed = events(
        run(gather_stream(server.chat_stream(request.model_copy(update={"stream": True}))))
    )
    assert streamed[-1] == "[DONE]"
    assert streamed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in streamed[1:-1])
    assert text == want
    assert streamed[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in streamed[:-1])


def test_chat_logprobs(server: LLMServer) -> None:
    request = ChatCompletionRequest(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
    )
    content = run(server.chat(request))["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for token in content:
        assert token["logprob"] == max(t["logprob"] for t in token["top_logprobs"])  # greedy
        assert token["bytes"] == list(token["token"].encode())


def test_request_errors(server: LLMServer) -> None:
    too_long = CompletionRequest(model="tiny", prompt=[5] * server.context_len)
    with pytest.raises(APIError) as info:
        run(server.completion(too_long))
    assert (info.value.status, info.value.code, info.value.param) == (
        400,
        "context_length_exceeded",
        "prompt",
    )
    over = CompletionRequest(model="tiny", prompt="x", max_tokens=server.context_len)
    with pytest.raises(APIError) as info:
        run(server.completion(over))
    assert info.value.param == "max_tokens"
    with pytest.raises(APIError) as info:
        run(server.completion(CompletionRequest(model="tiny", prompt=[1, 10**6])))
    assert info.value.param == "prompt"


def test_engine_queue_full_is_429_with_retry_after(server: LLMServer) -> None:
    # 2 prompts x 10 choices = 20 sequences > max_batch_size 16 + max_waiting 2
    many = CompletionRequest(model="tiny", prompt=["x", "y"], n=10, max_tokens=2)
    with pytest.raises(APIError) as info:
        run(server.completion(many))
    assert info.value.status == 429 and "Retry-After" in info.value.headers()
    for _ in range(200):  # the accepted part was aborted, not leaked
        if server.engine.stats()["live"] == 0:
            break
        time.sleep(0.01)
    assert server.engine.stats()["live"] == 0
    ok = run(server.completion(CompletionRequest(model="tiny", prompt="x", max_tokens=2)))
    assert ok["choices"][0]["finish_reason"] in ("stop", "length")
