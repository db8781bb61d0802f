"""The trained tiny text-to-image model behind OpenAI's images API on a local Ray Serve app, with
the official `openai` client.

    python -m pytest -q tests/ray/test_serve_images.py

The model is the session's `fmray diffusion` fit of the tiny pixel preset (`diffusion_pixel_run`
in conftest.py, which test_diffusion.py checks), served from its run folder through
jobs/serve/image_tiny.yaml, as `fmray serve --config jobs/serve/image_tiny.yaml` serves it:
the served images pass the adherence checker at the run's own offline figure, a seeded request
is the same image alone and batched on a real replica, and stopping the app drains its requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from fmray.config import load_config
from fmray.data.images import all_prompts
from fmray.eval.adherence import adherence
from fmray.serve.app import ServeConfig, build_application, check_model_paths
from fmray.serve.images import decode_png

pytestmark = pytest.mark.ray

PORT = 8769
BASE = f"http://127.0.0.1:{PORT}"
API_KEY = "image-test-key"
APP = "fmray-test-images"
MODEL = "diffusion-tiny"
PRESET = Path(__file__).resolve().parents[2] / "jobs" / "serve" / "image_tiny.yaml"
NUM_PROMPTS = 36  # the fit's sample.num_adherence_prompts, seeds 0..35, 10 steps, guidance 4
# Seeded images alone vs in a batch: float differences of a few 1e-6 (measured in the unit
# tier), so at most one level after PNG rounding.
MAX_BATCH_LEVELS = 1


@pytest.fixture(scope="module")
def app(ray_cluster, diffusion_pixel_run) -> Iterator[str]:
    from ray import serve

    overrides = [
        f"image_models.{MODEL}.path={diffusion_pixel_run.run_dir}",  # the run folder itself
        f"serve.port={PORT}",
        f"serve.api_key={API_KEY}",
        "autoscaling.max_replicas=1",
    ]
    config = check_model_paths(load_config(ServeConfig, PRESET, overrides))
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_application(config), name=APP, route_prefix="/")
    yield BASE
    serve.delete(APP)
    serve.shutdown()


def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def generate(prompt: str, seed: int, **extra: object) -> np.ndarray:
    response = client().images.generate(
        model=MODEL,
        prompt=prompt,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": seed, **extra},
    )
    assert len(response.data) == 1 and response.size == "32x32"
    return decode_png(response.data[0].b64_json)


def replica_batches() -> int:
    health = httpx.get(f"{BASE}/health", timeout=30).json()
    assert health["status"] == "ok", health
    return health["models"][MODEL]["batches"]


def test_served_images_adhere_as_the_run_measured_offline(app: str, diffusion_pixel_run) -> None:
    """The run's built-in prompts with its evaluation's seeds and steps, 8 at a time: the
    checker's colour accuracy equals the fit's own (up to one prompt for float noise)."""
    prompts = all_prompts()[:NUM_PROMPTS]

    def ask(i: int) -> np.ndarray:
        return generate(prompts[i][0], i, num_inference_steps=10, guidance_scale=4.0)

    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(ask, range(NUM_PROMPTS)))
    served = adherence(images, [attrs for _, attrs in prompts])
    offline = diffusion_pixel_run.metrics["colour_acc"]
    print(f"colour accuracy served {served['colour_acc']:.3f}, offline {offline:.3f}")
    assert served["colour_acc"] >= offline - 1 / NUM_PROMPTS - 1e-9, (served, offline)
    assert served["colour_acc"] >= 0.6


def test_seeded_request_alone_equals_batched_on_a_replica(app: str) -> None:
    prompt = "a green square on the right"
    alone = generate(prompt, 7)
    before = replica_batches()
    with ThreadPoolExecutor(8) as pool:  # 8 concurrent requests, the seeded one among them
        batched = list(pool.map(lambda i: generate(prompt, 7 + i), range(8)))
    assert len(batched) == 8 and all(image.shape == (32, 32, 3) for image in batched)
    assert replica_batches() - before < 8, "concurrent requests should share denoising loops"
    assert np.abs(alone.astype(int) - batched[0]).max() <= MAX_BATCH_LEVELS


def test_errors_and_models_through_serve(app: str) -> None:
    cards = client().models.list().data
    assert [card.id for card in cards] == [MODEL] and cards[0].model_extra["sizes"] == ["32x32"]
    with pytest.raises(openai.BadRequestError) as info:
        client().images.generate(model=MODEL, prompt="a red circle", size="64x64")
    assert info.value.param == "size" and "32x32" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client().images.generate(model="nope", prompt="a red circle")
    reply = httpx.post(f"{BASE}/v1/images/generations", json={"model": MODEL, "prompt": "x"})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_deleting_the_app_drains_requests_in_flight(app: str) -> None:
    """Last: stopping the app (what Ctrl-C / SIGTERM of `fmray serve` does) lets the requests
    already sent finish with their images."""
    from ray import serve

    results: list[np.ndarray | BaseException] = []

    def ask(i: int) -> None:
        try:
            results.append(generate("a red circle on the left", 50 + i, num_inference_steps=30))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            results.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the requests reach the replica
    serve.delete(APP)
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 3
    assert all(isinstance(r, np.ndarray) and r.shape == (32, 32, 3) for r in results), results
