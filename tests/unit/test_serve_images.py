"""Image models behind the OpenAI images API, in-process (no Ray): the batched denoising loop
against the stock diffusers pipeline, the batcher, and `/v1/images/generations` over real HTTP
with the official `openai` client.

    python -m pytest -q tests/unit/test_serve_images.py

The model is the tiny pixel preset with random weights (what `fmray diffusion` starts from),
saved as a diffusers directory with the DPM-Solver sampler that fmray's checkpoints carry.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from fmray.config import ConfigError, load_config, validate_config
from fmray.generation.engine import EngineOverloaded, EngineStopped
from fmray.models.diffusion import build_servable_preset
from fmray.serve.app import (
    InProcessAPI,
    ServeConfig,
    build_application,
    check_model_paths,
    print_usage,
)
from fmray.serve.config import ImageEngineSection
from fmray.serve.denoise import ImagePipeline, ImageSpec
from fmray.serve.errors import APIError
from fmray.serve.image_engine import ImageEngine
from fmray.serve.image_schemas import ImageGenerationRequest
from fmray.serve.images import ImageServer, decode_png

API_KEY = "image-key"
STEPS = 4
PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle"]
# Measured here: a seeded image alone and inside a batch of 8 differs by at most 3.1e-6 in
# float (batch-size-dependent CPU kernels), which after PNG rounding is 0 or 1 level.
MAX_BATCH_LEVELS = 1


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as a replica with num_cpus=1 runs: on a busy 2-core machine two
    threads made the loop 40x slower (measured), and the images are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_servable_preset("tiny", tmp_path_factory.mktemp("tiny_t2i"))


@pytest.fixture(scope="module")
def pipeline(pipeline_dir: Path) -> ImagePipeline:
    return ImagePipeline.load(pipeline_dir)


@pytest.fixture(scope="module")
def api(pipeline_dir: Path, tiny_model_dir: Path) -> Iterator[InProcessAPI]:
    config = {
        "models": {"tiny": {"path": str(tiny_model_dir)}},
        "image_models": {"shapes": {"path": str(pipeline_dir)}},
        "image_engine": {"num_inference_steps": STEPS, "max_batch_size": 8, "batch_wait_s": 0.05},
        "serve": {"api_key": API_KEY},
    }
    api = InProcessAPI(validate_config(ServeConfig, config))
    yield api
    api.close()


@pytest.fixture(scope="module")
def base(api: InProcessAPI) -> Iterator[str]:
    with api.http_server() as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def images_of(response) -> list[np.ndarray]:
    return [decode_png(item.b64_json) for item in response.data]


def as_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


# ---- the loop ----


@pytest.mark.parametrize("preset", ["tiny", "tiny-latent"])
def test_loop_gives_the_stock_pipelines_images(preset: str, tmp_path: Path) -> None:
    """Same prompts, seeds, steps and guidance: diffusers' IF / Stable Diffusion pipeline and the
    served loop give the same images (measured: max diff 0.0 for both layouts)."""
    from diffusers import DiffusionPipeline

    from fmray.models.diffusion import generate

    model_dir = build_servable_preset(preset, tmp_path / preset)
    stock = DiffusionPipeline.from_pretrained(str(model_dir))
    stock.set_progress_bar_config(disable=True)
    served = ImagePipeline.load(model_dir)
    seeds = [11, 12, 13]
    expected = generate(stock, PROMPTS, seeds, STEPS, 4.0)
    specs = [ImageSpec(p, "", s, 4.0) for p, s in zip(PROMPTS, seeds, strict=True)]
    got = served.generate(specs, *served.native_size(), STEPS)
    assert got.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # Guidance off (<= 1) for one image of a mixed batch: the stock pipeline without guidance.
    mixed = served.generate([ImageSpec(PROMPTS[0], "", 11, 1.0), specs[1]], 32, 32, STEPS)
    unguided = generate(stock, PROMPTS[:1], [11], STEPS, 1.0)
    np.testing.assert_allclose(mixed[0], unguided[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(mixed[1], expected[1], atol=1e-5, rtol=0)


def test_negative_prompt_and_sizes(pipeline: ImagePipeline) -> None:
    plain = pipeline.generate([ImageSpec(PROMPTS[0], "", 3, 4.0)], 32, 32, STEPS)
    negative = pipeline.generate([ImageSpec(PROMPTS[0], "a blue square", 3, 4.0)], 32, 32, STEPS)
    assert np.abs(plain - negative).max() > 1e-3  # the negative prompt steers guidance
    assert pipeline.native_size() == (32, 32) and pipeline.size_multiple() == 4
    wide = pipeline.generate([ImageSpec(PROMPTS[0], "", 3, 4.0)], 48, 32, STEPS)
    assert wide.shape == (1, 32, 48, 3)


# ---- the batcher ----


class Recorder:
    """A generate function that records its batches and can be held."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[int], tuple[int, int, int]]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, specs: list[ImageSpec], width: int, height: int, steps: int) -> np.ndarray:
        self.release.wait(timeout=30)
        self.batches.append(([s.seed for s in specs], (width, height, steps)))
        return np.stack([np.full((height, width, 3), s.seed / 100.0) for s in specs])


def test_batcher_groups_by_size_and_steps() -> None:
    recorder = Recorder()
    engine = ImageEngine(recorder, max_batch_size=4, max_waiting=16, batch_wait_s=0.0).start()
    recorder.release.clear()
    first = engine.submit([ImageSpec("a", "", 0, 4.0)], 32, 32, 4)  # runs alone, held
    time.sleep(0.2)
    futures = [
        engine.submit([ImageSpec("b", "", 1, 4.0), ImageSpec("b", "", 2, 4.0)], 32, 32, 4),
        engine.submit([ImageSpec("c", "", 3, 4.0)], 32, 32, 8),  # other steps: own batch
        engine.submit([ImageSpec("d", "", 4, 4.0)], 32, 32, 4),
        engine.submit([ImageSpec("e", "", 5, 4.0), ImageSpec("e", "", 6, 4.0)], 32, 32, 4),
    ]
    recorder.release.set()
    results = [f.result(timeout=30) for f in [first, *futures]]
    engine.shutdown()
    assert recorder.batches == [
        ([0], (32, 32, 4)),
        ([1, 2, 4], (32, 32, 4)),  # the oldest task's shape; e's two images no longer fit
        ([3], (32, 32, 8)),
        ([5, 6], (32, 32, 4)),
    ]
    # each request gets its own images back, in order
    sums = [float(r[:, 0, 0, 0].sum()) for r in results]
    assert sums == pytest.approx([0, 0.03, 0.03, 0.04, 0.11])


def test_batcher_overload_and_drain() -> None:
    recorder = Recorder()
    engine = ImageEngine(recorder, max_batch_size=2, max_waiting=2, batch_wait_s=0.0).start()
    recorder.release.clear()
    held = [engine.submit([ImageSpec("x", "", 0, 4.0)], 32, 32, 4)]  # runs, held
    time.sleep(0.2)
    held += [engine.submit([ImageSpec("x", "", i, 4.0)], 32, 32, 4) for i in (1, 2, 3)]
    with pytest.raises(EngineOverloaded):  # 3 waiting + 2 more > max_waiting + max_batch_size
        engine.submit([ImageSpec("y", "", 9, 4.0)] * 2, 32, 32, 4)
    assert engine.stats()["waiting_images"] >= 3
    engine.check_health()
    releaser = threading.Timer(0.3, recorder.release.set)
    releaser.start()
    engine.shutdown(drain_timeout_s=30)  # finishes what was queued, then stops
    assert all(f.result(timeout=1).shape == (1, 32, 32, 3) for f in held)
    with pytest.raises(EngineStopped):
        engine.submit([ImageSpec("z", "", 0, 4.0)], 32, 32, 4)
    with pytest.raises(RuntimeError, match="not running"):
        engine.check_health()


def test_server_errors_before_queueing(pipeline: ImagePipeline) -> None:
    config = ImageEngineSection(
        max_batch_size=4, num_inference_steps=4, max_inference_steps=8, sizes=["64x32"]
    )
    server = ImageServer("shapes", pipeline, config)  # not started: nothing may reach the engine
    cases = [
        ({"size": "64x64"}, "size"),
        ({"size": "big"}, "size"),
        ({"n": 5}, "n"),
        ({"num_inference_steps": 9}, "num_inference_steps"),
    ]
    for fields, param in cases:
        request = ImageGenerationRequest(model="shapes", prompt="a red circle", **fields)
        with pytest.raises(APIError) as info:
            asyncio.run(server.generate(request))
        assert info.value.status == 400 and info.value.param == param, fields
    assert server.size_of("64x32") == (64, 32) and server.size_of("auto") == (32, 32)
    with pytest.raises(ValueError, match="image_engine.sizes: '30x30'"):
        ImageServer("shapes", pipeline, ImageEngineSection(sizes=["30x30"]))


# ---- over HTTP with the openai client ----


def test_openai_client_images_generate(client: openai.OpenAI, pipeline: ImagePipeline) -> None:
    response = client.images.generate(
        model="shapes",
        prompt=PROMPTS[0],
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 40, "num_inference_steps": STEPS, "guidance_scale": 3.0},
    )
    assert response.size == "32x32" and response.created > 0
    images = images_of(response)
    assert [image.shape for image in images] == [(32, 32, 3)] * 2
    # image i uses seed + i: the loop called directly gives the same pixels
    specs = [ImageSpec(PROMPTS[0], "", 40 + i, 3.0) for i in range(2)]
    expected = as_uint8(pipeline.generate(specs, 32, 32, STEPS))
    for got, want in zip(images, expected, strict=True):
        assert np.abs(got.astype(int) - want).max() <= MAX_BATCH_LEVELS
    # no seed: random images each time
    a = images_of(client.images.generate(model="shapes", prompt=PROMPTS[1], size="32x32"))
    b = images_of(client.images.generate(model="shapes", prompt=PROMPTS[1], size="32x32"))
    assert not np.array_equal(a[0], b[0])


def test_seeded_request_alone_equals_batched(client: openai.OpenAI, api: InProcessAPI) -> None:
    def ask(i: int) -> np.ndarray:
        response = client.images.generate(
            model="shapes", prompt=PROMPTS[i % 3], size="32x32", extra_body={"seed": 100 + i}
        )
        return images_of(response)[0]

    alone = ask(0)
    engine = api.image_models["shapes"].server.engine
    batches_before = engine.stats()["batches"]
    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(ask, range(8)))  # all 8 served
    num_batches = engine.stats()["batches"] - batches_before
    assert num_batches < 8, "concurrent requests should share denoising loops"
    assert np.abs(alone.astype(int) - batched[0]).max() <= MAX_BATCH_LEVELS
    assert len({img.tobytes() for img in batched}) == 8


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"size": "64x64"}, 400, "size", "invalid_size"),
        ({"n": 11}, 400, "n", "invalid_value"),
        ({"n": 9}, 400, "n", "invalid_value"),  # above the model's max_batch_size of 8
        ({"prompt": "   "}, 400, "prompt", "invalid_value"),
        ({"model": "nope"}, 404, "model", "model_not_found"),
        ({"model": "tiny"}, 400, "model", "model_not_supported"),  # an LLM
        ({"response_format": "url"}, 400, "response_format", "invalid_value"),
        ({"num_inference_steps": 101}, 400, "num_inference_steps", "invalid_value"),
        ({"seed": -1}, 400, "seed", "invalid_value"),
        ({"styel": "vivid"}, 400, "styel", "unknown_parameter"),
        ({"stream": True}, 400, "stream", "invalid_value"),
        ({"size": "0x0"}, 400, "size", "invalid_size"),
        ({"size": "32x32" * 1000}, 400, "size", "invalid_size"),
        ({"prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
        ({"guidance_scale": 101}, 400, "guidance_scale", "invalid_value"),
    ],
)
def test_bad_requests_get_openai_errors(
    base: str, body: dict, status: int, param: str, code: str
) -> None:
    request = {"model": "shapes", "prompt": "a red circle", **body}
    reply = httpx.post(
        f"{base}/v1/images/generations",
        json=request,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["code"] == code, error
    assert error["message"] and "\n" not in error["message"]


def test_openai_client_raises_on_a_bad_size(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="shapes", prompt="a red circle", size="1024x1024")
    assert "32x32" in info.value.message and info.value.param == "size"


def test_models_health_and_api_key(base: str, client: openai.OpenAI) -> None:
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"tiny", "shapes"}
    assert cards["shapes"].model_extra["sizes"] == ["32x32"]
    assert cards["shapes"].model_extra["type"] == "image"
    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["status"] == "ok" and health["models"]["shapes"]["status"] == "ok"
    reply = httpx.post(f"{base}/v1/images/generations", json={"model": "shapes", "prompt": "x"})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    chat = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "shapes", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "model_not_supported"


# ---- config ----


def test_image_config_builds_image_deployments(pipeline_dir: Path) -> None:
    jobs = Path(__file__).resolve().parents[2] / "jobs" / "serve"
    override = f"image_models.diffusion-tiny.path={pipeline_dir}"
    config = load_config(ServeConfig, jobs / "combined_tiny.yaml", [override])
    app = build_application(config)
    ingress = app._bound_deployment
    images = ingress.init_args[3]
    assert set(images) == {"diffusion-tiny"} and set(ingress.init_args[0]) == {"tiny"}
    deployment = images["diffusion-tiny"]._bound_deployment
    assert deployment.name == "image-diffusion-tiny"
    assert deployment.max_ongoing_requests == 16 and deployment.max_queued_requests == 32
    only_images = load_config(ServeConfig, jobs / "image_tiny.yaml")
    assert only_images.models == {} and set(only_images.image_models) == {"diffusion-tiny"}
    with pytest.raises(ConfigError, match="image_models.tiny is also in models"):
        both = {"image_models": {"tiny": {"path": "x"}}, "models": {"tiny": {"path": "y"}}}
        validate_config(ServeConfig, both)
    with pytest.raises(ConfigError, match="image_engine.sizes"):
        validate_config(
            ServeConfig, {"image_models": {"s": {"path": "x"}}, "image_engine": {"sizes": ["32"]}}
        )


def test_fmray_serve_checks_image_paths_and_prints_an_images_curl(
    pipeline_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = validate_config(ServeConfig, {"image_models": {"s": {"path": str(tmp_path)}}})
    with pytest.raises(ConfigError, match=r"image_models\.s\.path=.*fmray diffusion --config"):
        check_model_paths(missing)  # before Ray starts, as `fmray serve` calls it
    found = validate_config(ServeConfig, {"image_models": {"s": {"path": str(pipeline_dir)}}})
    print_usage(check_model_paths(found))
    out = capsys.readouterr().out
    assert "curl http://localhost:8000/v1/images/generations" in out
    assert '"model": "s"' in out and "chat/completions" not in out
