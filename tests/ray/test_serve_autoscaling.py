"""Autoscaling of a model deployment under real HTTP load on a local Ray Serve app.

    python -m pytest -q tests/ray/test_serve_autoscaling.py

Short delays and a 0.25 s metrics interval keep the cycle (1 -> 2 -> 1 replicas) under a
minute; production configs keep Serve's slower defaults (see jobs/serve/llm_tiny.yaml).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fmray.config import validate_config
from fmray.serve.app import ServeConfig, build_application

pytestmark = pytest.mark.ray

PORT = 8765
APP = "fmray-test-autoscale"
DEPLOYMENT = "llm-tiny"


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model_dir: Path) -> Iterator[str]:
    from ray import serve

    config = validate_config(
        ServeConfig,
        {
            "models": {"tiny": {"path": str(tiny_model_dir)}},
            "serve": {"port": PORT},
            "engine": {"max_batch_size": 4},
            "deployment": {"num_cpus": 1, "max_ongoing_requests": 8},
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 2,
                "upscale_delay_s": 0.5,
                "downscale_delay_s": 2,
                "look_back_period_s": 1,
                "metrics_interval_s": 0.25,
            },
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_application(config), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{PORT}"
    serve.delete(APP)
    serve.shutdown()


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s}s: {what}"
        time.sleep(0.25)
    return time.monotonic() - start


def test_scales_up_under_sustained_load_then_back_down(app: str) -> None:
    assert running_replicas() == 1
    stop = threading.Event()
    statuses: list[int] = []
    body = {"model": "tiny", "prompt": "Anton has a", "max_tokens": 48, "temperature": 0}

    def client_loop(_: int) -> None:
        with httpx.Client(base_url=app, timeout=60) as http:
            while not stop.is_set():
                statuses.append(http.post("/v1/completions", json=body).status_code)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client_loop, i) for i in range(8)]
        try:
            up = wait_for(lambda: running_replicas() == 2, 90, "scale up to 2 replicas")
            time.sleep(1.0)  # both replicas take traffic for a moment
        finally:
            stop.set()
        for future in futures:
            future.result()
    assert statuses and set(statuses) == {200}, set(statuses)
    down = wait_for(lambda: running_replicas() == 1, 90, "scale back down to 1 replica")
    print(f"scaled up after {up:.1f}s of load, down {down:.1f}s after it stopped")
