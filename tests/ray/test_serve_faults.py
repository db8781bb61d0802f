"""A model replica SIGKILLed under load, through Ray Serve's own proxy and the official client.

    python -m pytest -q -m faults tests/ray/test_serve_faults.py     # make test-faults

16 OpenAI clients (default retries: 2) send completions, a quarter of them streamed, to a
deployment of two replicas; one replica is SIGKILLed a few seconds in. Non-streamed requests
that were on it come back as 503 with Retry-After and the client's retry lands on the other
replica; a stream already under way ends with an in-band error (nothing can retry it).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from fmray.config import validate_config
from fmray.serve.app import ServeConfig, build_application

pytestmark = [pytest.mark.ray, pytest.mark.faults]

PORT = 8768
APP = "fmray-faults"
DEPLOYMENT = "llm-tiny"
CLIENTS = 16
LOAD_SECONDS = 30.0
KILL_AT_S = 6.0
MIN_SUCCESS = 0.99
HEALTHY_AGAIN_S = 60.0


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model_dir: Path) -> Iterator[str]:
    from ray import serve

    config = validate_config(
        ServeConfig,
        {
            "models": {"tiny": {"path": str(tiny_model_dir)}},
            "serve": {"port": PORT},
            "engine": {"max_batch_size": 8, "max_model_len": 96},
            "deployment": {
                "num_cpus": 1,
                "max_ongoing_requests": 16,
                "health_check_period_s": 1,
                "health_check_timeout_s": 10,
            },
            "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_application(config), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{PORT}/v1"
    serve.delete(APP)
    serve.shutdown()


def replica_pids() -> list[int]:
    return sorted(
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if f"ServeReplica:{APP}:{DEPLOYMENT}" in " ".join(p.info["cmdline"] or [])
    )


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def test_a_killed_replica_under_load_loses_under_one_percent(
    app: str, record_property: Any
) -> None:
    pids = replica_pids()
    assert len(pids) == 2, pids
    retried: list[int] = []  # statuses the client retried (it retries 408/409/429/5xx)

    def on_response(response: httpx.Response) -> None:
        if response.status_code >= 400:
            retried.append(response.status_code)

    http = httpx.Client(event_hooks={"response": [on_response]}, timeout=60)
    client = openai.OpenAI(base_url=app, api_key="unused", http_client=http)  # max_retries: 2
    outcomes: list[tuple[bool, bool, str]] = []  # (streamed, succeeded, error)
    lock = threading.Lock()
    start = time.monotonic()

    def one(index: int, request: int) -> None:
        streamed = (index + request) % 4 == 0
        tokens = 1 + (index * 7 + request * 3) % 16
        try:
            if streamed:
                stream = client.completions.create(
                    model="tiny", prompt="Anton has a", max_tokens=tokens, stream=True
                )
                text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
            else:
                text = (
                    client.completions.create(model="tiny", prompt="Anton has a", max_tokens=tokens)
                    .choices[0]
                    .text
                )
            result = (streamed, isinstance(text, str), "")
        except openai.APIError as err:
            result = (streamed, False, f"{type(err).__name__}: {err}")
        with lock:
            outcomes.append(result)

    def client_loop(index: int) -> None:
        request = 0
        while time.monotonic() - start < LOAD_SECONDS:
            one(index, request)
            request += 1

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client_loop, i) for i in range(CLIENTS)]
        time.sleep(KILL_AT_S)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # The deployment is whole again: a replacement replica process (a new pid; Serve
        # starts one only once it has noticed the loss) RUNNING beside the survivor.
        while not (len(set(replica_pids()) - set(pids)) == 1 and running_replicas() == 2):
            assert time.monotonic() - killed_at < HEALTHY_AGAIN_S, "no replacement replica"
            time.sleep(0.1)
        healthy_after = time.monotonic() - killed_at
        for future in futures:
            future.result()

    failed = [o for o in outcomes if not o[1]]
    rate = 1 - len(failed) / len(outcomes)
    figures = (
        f"{len(outcomes)} requests, {len(failed)} failed "
        f"({sum(o[0] for o in failed)} of them streams under way), success {rate:.2%}, "
        f"{len(retried)} answers retried by the client ({sorted(set(retried))}), "
        f"deployment whole again after {healthy_after:.1f} s"
    )
    print(f"replica killed under load: {figures}")
    record_property("replica_kill", figures)
    assert len(outcomes) >= 100, len(outcomes)
    assert rate >= MIN_SUCCESS, failed[:5]
    assert len(replica_pids()) == 2
