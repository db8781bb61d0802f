"""The OpenAI API over real HTTP on a local Ray Serve app, with the official `openai` client.

    python -m pytest -q tests/ray/test_serve_openai.py

Two models in one app ('tiny' and 'tiny-b', different weights) check routing by `model`;
'tiny-b' runs with a one-slot engine and a one-request queue so overload is easy to provoke.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmray.config import validate_config
from fmray.data.chat_template import render_chat
from fmray.serve.app import ServeConfig, build_application

pytestmark = pytest.mark.ray

PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
APP = "fmray-test-llm"
PROMPTS = [
    "Anton has a purple dog.",
    "Hugo lives in Rome. Hugo has a blue turtle. Hugo is",
    "30 minus 8 is",
    "Grace works as a doctor. Grace lives in Paris. Grace has a purple dog. 27 minus 1 is",
]


@pytest.fixture(scope="module")
def second_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with other weights (seed 1) and the same tokenizer."""
    from fmray.models.registry import build_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = build_causal_lm("tiny", None, len(tokenizer), special)
    out = tmp_path_factory.mktemp("tiny_model_b")
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model_dir: Path, second_model_dir: Path) -> Iterator[str]:
    from ray import serve

    config = validate_config(
        ServeConfig,
        {
            "models": {
                "tiny": {"path": str(tiny_model_dir)},
                "tiny-b": {
                    "path": str(second_model_dir),
                    "engine": {"max_batch_size": 1, "max_waiting": 1},
                    "deployment": {
                        "num_cpus": 0.5,
                        "max_ongoing_requests": 3,
                        "max_queued_requests": 1,
                        "retry_after_s": 2,
                    },
                },
            },
            "serve": {"port": PORT, "api_key": API_KEY, "max_body_bytes": 65536},
            "deployment": {"num_cpus": 1},
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_application(config), name=APP, route_prefix="/")
    yield BASE
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, second_model_dir: Path) -> dict:
    torch.set_num_threads(1)
    load = AutoModelForCausalLM.from_pretrained
    return {
        "tiny": load(tiny_model_dir, dtype=torch.float32).eval(),
        "tiny-b": load(second_model_dir, dtype=torch.float32).eval(),
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def reference(model, tokenizer, prompt: str, max_tokens: int, chat: bool = False) -> str:
    """Greedy `generate` on the same weights, decoded like the server decodes."""
    if chat:
        text = render_chat(tokenizer, [{"role": "user", "content": prompt}])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    else:
        ids, eos = tokenizer(prompt)["input_ids"], [tokenizer.eos_token_id]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_models_list(app: str) -> None:
    listed = client().models.list()
    assert [m.id for m in listed.data] == ["tiny", "tiny-b"]
    assert client().models.retrieve("tiny-b").id == "tiny-b"


def test_greedy_matches_generate_and_routes_by_model(app, models, tokenizer) -> None:
    api = client()
    for name in ("tiny", "tiny-b"):
        out = api.completions.create(model=name, prompt=PROMPTS[1], max_tokens=20, temperature=0)
        assert out.choices[0].text == reference(models[name], tokenizer, PROMPTS[1], 20)
        assert out.model == name and out.usage.completion_tokens <= 20
    chat = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=16,
        temperature=0,
    )
    assert chat.choices[0].message.content == reference(
        models["tiny"], tokenizer, PROMPTS[0], 16, chat=True
    )
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_streams_equal_whole_responses(app) -> None:
    api = client()
    kwargs = dict(model="tiny", max_tokens=24, temperature=0.8, seed=11)
    whole = api.completions.create(prompt=PROMPTS[2], **kwargs)
    chunks = list(
        api.completions.create(
            prompt=PROMPTS[2], stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": PROMPTS[3]}]
    whole_chat = api.chat.completions.create(messages=messages, **kwargs)
    stream = api.chat.completions.create(messages=messages, stream=True, **kwargs)
    parts = [c.choices[0] for c in stream]
    assert parts[0].delta.role == "assistant"
    assert "".join(p.delta.content or "" for p in parts) == whole_chat.choices[0].message.content
    assert parts[-1].finish_reason == whole_chat.choices[0].finish_reason


def test_sixteen_concurrent_requests_are_independent(app, models, tokenizer) -> None:
    """Greedy rows equal generate; seeded sampled rows equal their solo re-run."""
    specs = []
    for i in range(16):
        spec = {"chat": i % 2 == 1, "prompt": PROMPTS[i % 4], "max_tokens": 4 + 3 * i}
        if i % 4 >= 2:
            spec.update(temperature=0.6 + 0.1 * (i % 5), top_p=0.8 + 0.05 * (i % 3), seed=i)
        else:
            spec.update(temperature=0.0)
        spec["stream"] = i % 3 == 0
        specs.append(spec)

    async def ask(api: openai.AsyncOpenAI, spec: dict) -> str:
        args = {k: spec[k] for k in ("max_tokens", "temperature", "top_p", "seed") if k in spec}
        stream = spec["stream"]
        if spec["chat"]:
            messages = [{"role": "user", "content": spec["prompt"]}]
            out = await api.chat.completions.create(
                model="tiny", messages=messages, stream=stream, **args
            )
            if stream:
                return "".join([c.choices[0].delta.content or "" async for c in out])
            return out.choices[0].message.content
        out = await api.completions.create(
            model="tiny", prompt=spec["prompt"], stream=stream, **args
        )
        if stream:
            return "".join([c.choices[0].text async for c in out])
        return out.choices[0].text

    async def run() -> tuple[list[str], list[str]]:
        api = openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=API_KEY, max_retries=0)
        together = await asyncio.gather(*(ask(api, s) for s in specs))
        sampled = [s for s in specs if s["temperature"] > 0]
        alone = [await ask(api, {**s, "stream": False}) for s in sampled]  # same seeds, solo
        return together, alone

    texts, alone = asyncio.run(run())
    solo = iter(alone)
    for spec, text in zip(specs, texts, strict=True):
        if spec["temperature"] == 0.0:
            prompt, limit = spec["prompt"], spec["max_tokens"]
            want = reference(models["tiny"], tokenizer, prompt, limit, spec["chat"])
        else:
            want = next(solo)
        assert text == want, spec
    sampled = [t for s, t in zip(specs, texts, strict=True) if s["temperature"] > 0]
    assert len(set(sampled)) == len(sampled)  # different seeds, different texts


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def health() -> dict:
    response = httpx.get(f"{BASE}/health", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["models"]


def test_errors_are_openai_bodies_and_replicas_survive(app) -> None:
    replicas = {name: state["replica"] for name, state in health().items()}
    http = httpx.Client(base_url=BASE, timeout=60)
    url = "/v1/completions"
    ok = {"model": "tiny", "prompt": "Anton", "max_tokens": 2}
    assert error_of(http.post(url, json=ok), 401)["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer nope"}
    assert error_of(http.post(url, json=ok, headers=wrong), 401)["code"] == "invalid_api_key"
    assert (
        error_of(http.post(url, content=b'{"model": ', headers=AUTH), 400)["code"] == "invalid_json"
    )
    assert error_of(http.post(url, json=[1], headers=AUTH), 400)["code"] == "invalid_json"
    bad = {**ok, "temperature": 5}
    assert error_of(http.post(url, json=bad, headers=AUTH), 400)["param"] == "temperature"
    typo = {**ok, "max_token": 3}
    assert error_of(http.post(url, json=typo, headers=AUTH), 400)["param"] == "max_token"
    missing = {**ok, "model": "gpt-9"}
    assert error_of(http.post(url, json=missing, headers=AUTH), 404)["code"] == "model_not_found"
    assert error_of(http.get("/v1/nothing", headers=AUTH), 404)["code"] == "not_found"
    huge = {**ok, "prompt": "x" * 70_000}
    assert error_of(http.post(url, json=huge, headers=AUTH), 413)["code"] == "request_too_large"
    long = {**ok, "prompt": "Anton has a dog. " * 200}
    error = error_of(http.post(url, json=long, headers=AUTH), 400)
    assert error["code"] == "context_length_exceeded"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}
    url_chat = "/v1/chat/completions"
    assert error_of(http.post(url_chat, json=chat, headers=AUTH), 400)["param"] == "max_tokens"
    stream = {**long, "stream": True}
    assert (
        error_of(http.post(url, json=stream, headers=AUTH), 400)["code"]
        == "context_length_exceeded"
    )
    assert {name: state["replica"] for name, state in health().items()} == replicas
    assert http.post(url, json=ok, headers=AUTH).status_code == 200


def test_overload_answers_503_and_429_with_retry_after(app) -> None:
    """tiny-b: engine holds 1 running + 1 waiting, the replica 3 ongoing, the queue 1."""
    replica = health()["tiny-b"]["replica"]
    body = {"model": "tiny-b", "prompt": "Anton has", "max_tokens": 300, "temperature": 0}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{BASE}/v1/completions", json=body, headers=AUTH, timeout=120)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429, 503} and 200 in statuses, statuses
    assert 429 in statuses and 503 in statuses, statuses
    for response in responses:
        if response.status_code != 200:
            assert error_of(response, response.status_code)["code"] == "overloaded"
            assert int(response.headers["Retry-After"]) >= 1
    assert health()["tiny-b"]["replica"] == replica
    after = httpx.post(f"{BASE}/v1/completions", json={**body, "max_tokens": 2}, headers=AUTH)
    assert after.status_code == 200


def test_client_disconnect_stops_generation(app) -> None:
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{BASE}/v1/completions", json=body, headers=AUTH) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
    deadline = time.monotonic() + 20
    while health()["tiny"]["live"] > 0:  # the engine dropped the abandoned sequence
        assert time.monotonic() < deadline, "the abandoned stream kept generating"
        time.sleep(0.2)
