"""Hostile HTTP clients against the API in-process (the same ASGI app as on Serve, a real
uvicorn server in a thread, the tiny model's real engine): each gets a 4xx with OpenAI's error
JSON and a clear message, and the model serves the next normal request.

    python -m pytest -q tests/unit/test_hostile_serve.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from fmray.config import validate_config
from fmray.serve.app import InProcessAPI, ServeConfig

API_KEY = "sk-fmray-test-7f3a9c1e"
WRONG_KEY = "sk-fmray-wrong-55b2d0e4"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONTEXT = 64  # engine.max_model_len: small, so context errors are cheap to provoke
OK = {"model": "tiny", "prompt": "Anton has a", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def api(tiny_model_dir: Path) -> Iterator[InProcessAPI]:
    torch.set_num_threads(1)
    config = {
        "models": {"tiny": {"path": str(tiny_model_dir)}},
        "engine": {"max_model_len": CONTEXT, "max_batch_size": 8, "max_waiting": 32},
        "serve": {"api_key": API_KEY},  # max_body_bytes: the default 1 MiB
    }
    api = InProcessAPI(validate_config(ServeConfig, config))
    yield api
    api.close()


@pytest.fixture(scope="module")
def base(api: InProcessAPI) -> Iterator[str]:
    with api.http_server() as url:
        yield url


@pytest.fixture(scope="module")
def http(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, headers=AUTH, timeout=60) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI error body, checked field by field."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and 0 < len(error["message"]) < 400, error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    return error


def live_sequences(api: InProcessAPI) -> int:
    return api.models["tiny"].server.engine.stats()["live"]


def assert_healthy(http: httpx.Client, api: InProcessAPI) -> None:
    response = http.post("/v1/completions", json=OK)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    assert live_sequences(api) == 0


def test_json_nested_50000_levels_is_a_400(http: httpx.Client, api: InProcessAPI) -> None:
    deep = b"[" * 50_000 + b"]" * 50_000
    chat = b'{"model": "tiny", "messages": ' + deep + b"}"
    for body in (deep, chat):
        response = http.post("/v1/chat/completions", content=body)
        error = error_of(response, 400)
        assert error["code"] == "invalid_json" and "nests too deeply" in error["message"]
    assert_healthy(http, api)


def test_10_mb_prompt_gets_the_413_while_still_sending(base: str, http, api) -> None:
    prompt = "Anton has a dog. " * 620_000  # 10.5 MB
    big = {"model": "tiny", "prompt": prompt}
    error = error_of(http.post("/v1/completions", json=big), 413)
    assert error["code"] == "request_too_large" and "limit of 1048576 bytes" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        data = json.dumps(big).encode()
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    error = error_of(http.post("/v1/completions", content=chunks()), 413)
    assert error["code"] == "request_too_large"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="tiny", prompt=prompt)
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"
    assert_healthy(http, api)


def test_raw_socket_sends_all_10_mb_then_reads_the_413(base: str) -> None:
    """A client that reads nothing until its whole body is written still gets the answer."""
    body = json.dumps({"model": "tiny", "prompt": "x" * 10_000_000}).encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:200]
    body_json = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body_json["error"]["code"] == "request_too_large"


LONG_PROMPT = "Anton has a purple dog. " * 40
CHAT = "/v1/chat/completions"
ONE_MESSAGE = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
JSON_TYPE = "application/json; charset=latin-1"
FORM_TYPE = "application/x-www-form-urlencoded"  # what `curl -d` sends without -H
# what, request arguments, status, code, param, words in the message
# fmt: off
HOSTILE = [
    ("invalid UTF-8", {"content": b'{"model": "tiny", "prompt": "caf\xe9"}'},
     400, "invalid_json", None, "not UTF-8"),
    ("lone surrogate", {"content": b'{"model": "tiny", "prompt": "a\\ud800b"}'},
     400, "invalid_json", None, "not valid Unicode"),
    ("text/plain", {"content": b"{}", "headers": {"Content-Type": "text/plain"}},
     415, "unsupported_media_type", None, "application/json"),
    ("form body", {"content": b"model=tiny", "headers": {"Content-Type": FORM_TYPE}},
     415, "unsupported_media_type", None, "application/json"),
    ("latin-1 JSON", {"content": b"{}", "headers": {"Content-Type": JSON_TYPE}},
     415, "unsupported_media_type", None, "UTF-8"),
    ("empty body", {"content": b""}, 400, "invalid_json", None, "parse"),
    ("JSON array", {"json": [OK]}, 400, "invalid_json", None, "JSON object"),
    ("NaN temperature", {"content": b'{"model": "tiny", "prompt": "x", "temperature": NaN}'},
     400, "invalid_value", "temperature", "temperature"),
    ("prompt over the context", {"json": {**OK, "prompt": LONG_PROMPT}},
     400, "context_length_exceeded", "prompt", "maximum context length is 64 tokens"),
    ("token ids over the context", {"json": {**OK, "prompt": [5] * 200}},
     400, "context_length_exceeded", "prompt", "maximum context length"),
    ("chat over the context", {"url": CHAT, "json": {
        "model": "tiny", "messages": [{"role": "user", "content": LONG_PROMPT}]}},
     400, "context_length_exceeded", "messages", "maximum context length"),
    ("max_tokens 10^12", {"json": {**OK, "max_tokens": 10**12}},
     400, "context_length_exceeded", "max_tokens", "reduce max_tokens"),
    ("max_tokens 0", {"json": {**OK, "max_tokens": 0}},
     400, "invalid_value", "max_tokens", "greater than or equal to 1"),
    ("max_tokens text", {"json": {**OK, "max_tokens": "lots"}},
     400, "invalid_value", "max_tokens", "integer"),
    ("n 10^6", {"json": {**OK, "n": 10**6}}, 400, "invalid_value", "n", "less than or equal"),
    ("n -1", {"json": {**OK, "n": -1}}, 400, "invalid_value", "n", "greater than or equal"),
    ("64 prompts x n 16", {"json": {**OK, "prompt": ["a"] * 64, "n": 16}},
     400, "invalid_value", None, "sequences one request may start"),
    ("top_logprobs 10^4", {"url": CHAT, "json": {
        **ONE_MESSAGE, "logprobs": True, "top_logprobs": 10_000}},
     400, "invalid_value", "top_logprobs", "less than or equal"),
    ("completion logprobs 99", {"json": {**OK, "logprobs": 99}},
     400, "invalid_value", "logprobs", "less than or equal"),
    ("100 stop strings", {"json": {**OK, "stop": ["x"] * 100}},
     400, "invalid_value", None, "stop takes up to 4"),
    ("a 10,000-character stop", {"json": {**OK, "stop": "x" * 10_000}},
     400, "invalid_value", None, "1 to 256 characters"),
    ("token id outside the vocabulary", {"json": {**OK, "prompt": [1, 10**9]}},
     400, "invalid_value", "prompt", "outside the vocabulary"),
    ("negative token id", {"json": {**OK, "prompt": [[3], [-1]]}},
     400, "invalid_value", "prompt", "outside the vocabulary"),
    ("empty token list", {"json": {**OK, "prompt": [[]]}},
     400, "invalid_value", "prompt", "non-empty"),
    ("unknown model", {"json": {**OK, "model": "gpt-9"}},
     404, "model_not_found", "model", "does not exist"),
    ("path-like model", {"json": {**OK, "model": "../../../etc/passwd"}},
     404, "model_not_found", "model", "does not exist"),
    ("model name of 100,000 characters", {"json": {**OK, "model": "m" * 100_000}},
     404, "model_not_found", "model", "does not exist"),
    ("path-like model card", {"method": "GET", "url": "/v1/models/..%2F..%2Fetc%2Fpasswd"},
     404, "model_not_found", "model", "does not exist"),
    ("unknown field", {"json": {**OK, "max_token": 3}},
     400, "unknown_parameter", "max_token", "Unrecognized request argument"),
    ("GET on a POST route", {"method": "GET"}, 405, "method_not_allowed", None, "Not Allowed"),
    ("unknown path", {"url": "/v1/engines"}, 404, "not_found", None, "Not Found"),
]
# fmt: on


@pytest.mark.parametrize(
    ("request_args", "status", "code", "param", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in HOSTILE],
)
def test_hostile_request_is_a_clear_4xx(
    http: httpx.Client, api: InProcessAPI, request_args: dict, status, code, param, words
) -> None:
    args = dict(request_args)
    method, url = args.pop("method", "POST"), args.pop("url", "/v1/completions")
    error = error_of(http.request(method, url, **args), status)
    assert (error["code"], error["param"]) == (code, param), error
    assert words in error["message"], error["message"]
    assert error["type"] == "invalid_request_error"
    assert_healthy(http, api)


def test_api_key_guards_every_endpoint_but_health(base: str, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    anonymous = httpx.Client(base_url=base, timeout=30)
    wrong = httpx.Client(
        base_url=base, timeout=30, headers={"Authorization": f"Bearer {WRONG_KEY}"}
    )
    for path in ("/v1/models", "/v1/models/tiny", "/openapi.json", "/v1/anything", "/docs"):
        for client in (anonymous, wrong):
            assert error_of(client.get(path), 401)["code"] == "invalid_api_key"
    for path in ("/v1/completions", "/v1/chat/completions"):
        for client in (anonymous, wrong):
            assert error_of(client.post(path, json=OK), 401)["code"] == "invalid_api_key"
    basic = {"Authorization": f"Basic {API_KEY}"}
    assert error_of(anonymous.get("/v1/models", headers=basic), 401)["code"] == "invalid_api_key"
    assert anonymous.get("/health").status_code == 200
    authorized = httpx.Client(base_url=base, timeout=30, headers=AUTH)
    assert authorized.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert authorized.post("/v1/completions", json=OK).status_code == 200
    printed = capsys.readouterr()
    logged = caplog.text + printed.out + printed.err
    assert API_KEY not in logged and WRONG_KEY not in logged


def test_disconnects_in_the_middle_of_many_streams_empty_the_batch(base: str, http, api) -> None:
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 60, "stream": True}

    async def open_and_drop(client: httpx.AsyncClient) -> str:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return line  # leaving the block closes the connection mid-stream
        return ""

    async def streams() -> list[str]:
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(open_and_drop(client) for _ in range(32)))

    engine = api.models["tiny"].server.engine
    before = engine.stats()["generated_tokens"]
    firsts = asyncio.run(streams())
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in firsts)
    deadline = time.monotonic() + 15
    while live_sequences(api) > 0:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.05)
    generated = engine.stats()["generated_tokens"] - before
    print(f"32 streams dropped after their first chunk: {generated} tokens generated of 1920")
    assert generated < 32 * 60 / 2  # the abandoned sequences left the batch early
    assert_healthy(http, api)


def test_pickle_only_model_folder_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    from fmray.cli import main
    from fmray.serve.llm import LLMServer
    from fmray.serve.loading import PickleWeightsError

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(SystemExit) as stopped:  # `fmray serve`, before Ray starts
        main(["serve", f"models.tiny.path={folder}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"config error: models.tiny.path: {folder} has only pickle weights (pytorch_model.bin): "
        "fmray serves safetensors weights only (a pickle can run code when loaded); convert it "
        "once where you trust it, with transformers' "
        "from_pretrained(...).save_pretrained(out_dir)\n"
    )
    with pytest.raises(PickleWeightsError, match="only pickle weights"):  # what a replica runs
        LLMServer.load("tiny", str(folder))


def test_a_replica_lost_under_a_request_is_a_retryable_503() -> None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from fmray.serve.ingress import as_api_error

    for lost in (ActorDiedError(), ActorUnavailableError("unreachable", None)):
        error = as_api_error(lost)
        assert (error.status, error.code) == (503, "overloaded"), lost
        assert error.retry_after_s and "retry" in str(error.body())
