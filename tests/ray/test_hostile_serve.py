"""Hostile clients through Ray Serve's own HTTP proxy: the checks that need the real proxy,
replicas and logs (the rest run in-process: tests/unit/test_hostile_serve.py).

    python -m pytest -q tests/ray/test_hostile_serve.py
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from fmray.config import validate_config
from fmray.serve.app import ServeConfig, build_application

pytestmark = pytest.mark.ray

PORT = 8766
BASE = f"http://127.0.0.1:{PORT}"
API_KEY = "sk-fmray-ray-4c8e1b7a"
WRONG_KEY = "sk-fmray-ray-wrong-9d2f"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
APP = "fmray-hostile"
OK = {"model": "tiny", "prompt": "Anton has a", "max_tokens": 2}


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model_dir: Path) -> Iterator[str]:
    from ray import serve

    config = validate_config(
        ServeConfig,
        {
            "models": {"tiny": {"path": str(tiny_model_dir)}},
            "engine": {"max_batch_size": 4, "max_waiting": 4, "max_model_len": 96},
            "deployment": {
                "num_cpus": 1,
                "max_ongoing_requests": 8,
                "max_queued_requests": 2,
                "retry_after_s": 2,
            },
            "serve": {"port": PORT, "api_key": API_KEY},  # max_body_bytes: the default 1 MiB
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_application(config), name=APP, route_prefix="/")
    yield BASE
    serve.delete(APP)
    serve.shutdown()  # the next Serve test starts its own instance on its own port


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def stats() -> dict:
    response = httpx.get(f"{BASE}/health", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["models"]["tiny"]


def assert_healthy(replica: str) -> None:
    response = httpx.post(f"{BASE}/v1/completions", json=OK, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert stats()["replica"] == replica  # the same replica: nothing restarted it


def test_10_mb_and_50000_levels_through_the_serve_proxy(app: str) -> None:
    replica = stats()["replica"]
    big = {"model": "tiny", "prompt": "x" * 10_000_000}
    response = httpx.post(f"{BASE}/v1/completions", json=big, headers=AUTH, timeout=60)
    assert error_of(response, 413)["code"] == "request_too_large"
    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="tiny", prompt="x" * 10_000_000)
    assert caught.value.status_code == 413
    body = json.dumps(big).encode()  # a client that reads only after writing everything
    with socket.create_connection(("127.0.0.1", PORT), timeout=60) as sock:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
    deep = b'{"model": "tiny", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    response = httpx.post(f"{BASE}/v1/chat/completions", content=deep, headers=AUTH, timeout=60)
    assert error_of(response, 400)["code"] == "invalid_json"
    assert_healthy(replica)


def test_api_key_on_every_endpoint_and_never_in_ray_logs(app: str, ray_cluster) -> None:
    wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
    for headers in ({}, wrong):
        for path in ("/v1/models", "/v1/models/tiny", "/openapi.json", "/docs"):
            response = httpx.get(f"{BASE}{path}", headers=headers, timeout=30)
            assert error_of(response, 401)["code"] == "invalid_api_key"
        for path in ("/v1/completions", "/v1/chat/completions"):
            response = httpx.post(f"{BASE}{path}", json=OK, headers=headers, timeout=30)
            assert error_of(response, 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{BASE}/health", timeout=30).status_code == 200
    assert httpx.get(f"{BASE}/openapi.json", headers=AUTH, timeout=30).status_code == 200
    time.sleep(1.0)  # log lines reach their files
    logs = Path(ray_cluster._private.worker._global_node.get_session_dir_path()) / "logs"
    leaks = []
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            leaks += [f"{path.name}: {key}" for key in (API_KEY, WRONG_KEY) if key.encode() in text]
    assert not leaks, leaks


def test_disconnects_mid_stream_empty_the_replica_batch(app: str) -> None:
    replica = stats()["replica"]
    before = stats()["generated_tokens"]
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 80, "stream": True}

    def open_and_drop(_: int) -> str:
        # Serve counts requests still waiting for a replica assignment against
        # max_queued_requests (2 here), so a burst can be told to retry: the client does.
        for _attempt in range(20):
            with httpx.stream(
                "POST", f"{BASE}/v1/completions", json=body, headers=AUTH, timeout=60
            ) as response:
                if response.status_code == 503:
                    response.read()
                    time.sleep(0.2)
                    continue
                assert response.status_code == 200, response.read()
                return next(line for line in response.iter_lines() if line.startswith("data: "))
        raise AssertionError("still refused after 20 tries")

    with ThreadPoolExecutor(6) as pool:  # below max_ongoing_requests: all are served
        firsts = list(pool.map(open_and_drop, range(6)))
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in firsts)
    deadline = time.monotonic() + 20
    while stats()["live"] > 0:
        assert time.monotonic() < deadline, stats()
        time.sleep(0.1)
    assert stats()["generated_tokens"] - before < 6 * 80 / 2
    assert_healthy(replica)


def test_overload_is_refused_fast_with_retry_after(app: str) -> None:
    """8 ongoing + 2 queued are served; the rest are told quickly when to retry."""
    replica = stats()["replica"]
    body = {**OK, "max_tokens": 90, "prompt": "Emma", "temperature": 0}

    def post(_: int) -> tuple[int, float, str | None]:
        start = time.monotonic()
        response = httpx.post(f"{BASE}/v1/completions", json=body, headers=AUTH, timeout=120)
        seconds = time.monotonic() - start
        if response.status_code != 200:
            assert error_of(response, response.status_code)["code"] == "overloaded"
        return response.status_code, seconds, response.headers.get("Retry-After")

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(post, range(24)))
    refused = [a for a in answers if a[0] in (429, 503)]
    served = [a for a in answers if a[0] == 200]
    assert len(served) + len(refused) == 24 and refused and served, answers
    assert all(retry == "2" for _, _, retry in refused), refused
    slowest_refusal = max(seconds for _, seconds, _ in refused)
    print(f"{len(refused)} of 24 refused, slowest refusal {slowest_refusal:.2f}s")
    assert slowest_refusal < 5.0, refused  # ~2 s measured here on 2 busy cores: never a hang
    assert_healthy(replica)
