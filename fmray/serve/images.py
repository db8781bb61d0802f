"""One served image model, in-process: OpenAI images request -> image specs -> batched denoising
loop -> base64 PNGs.

    fmray serve --config jobs/serve/image_tiny.yaml
    python bench/serve_diffusion.py          # uses it directly as the no-HTTP reference

A Serve replica (`fmray.serve.deployment.ImageDeployment`) holds exactly one `ImageServer`; the
unit tests and the benchmark use it without Ray. Request errors (size, n, steps) are APIErrors
naming the field, raised before anything is queued.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
from pathlib import Path

import numpy as np

from fmray.generation.engine import EngineOverloaded, EngineStopped
from fmray.serve.config import ImageEngineSection
from fmray.serve.denoise import ImagePipeline, ImageSpec
from fmray.serve.errors import APIError, internal_error, invalid_request, overloaded
from fmray.serve.image_engine import ImageEngine
from fmray.serve.image_schemas import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    parse_size,
    size_text,
)
from fmray.serve.schemas import ModelCard, now


class ImageServer:
    def __init__(
        self,
        name: str,
        pipeline: ImagePipeline,
        engine: ImageEngineSection,
        retry_after_s: float = 1.0,
    ) -> None:
        self.name = name
        self.pipeline = pipeline
        self.config = engine
        self.native = pipeline.native_size()
        self.sizes = {size_text(*self.native): self.native}
        for size in engine.sizes:
            self.sizes[size] = check_size(size, pipeline.size_multiple())
        self.engine = ImageEngine(
            pipeline.generate,
            max_batch_size=engine.max_batch_size,
            max_waiting=engine.max_waiting,
            batch_wait_s=engine.batch_wait_s,
            stall_timeout_s=engine.stall_timeout_s,
        )
        self.retry_after_s = retry_after_s
        self.created = now()
        self.model_dir: Path | None = getattr(pipeline, "model_dir", None)

    @classmethod
    def load(
        cls,
        name: str,
        path: str,
        engine: ImageEngineSection | None = None,
        num_gpus: float = 0.0,
        retry_after_s: float = 1.0,
    ) -> ImageServer:
        engine = engine or ImageEngineSection()
        pipeline = ImagePipeline.load(path, engine.dtype, num_gpus)
        return cls(name, pipeline, engine, retry_after_s)

    def start(self) -> ImageServer:
        self.engine.start()
        return self

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self.engine.shutdown(drain_timeout_s)

    def card(self) -> ModelCard:
        return ModelCard(
            id=self.name,
            created=self.created,
            type="image",
            sizes=list(self.sizes),
            max_images=self.max_images(),
        )

    def max_images(self) -> int:
        return min(10, self.config.max_batch_size)

    # ---- /v1/images/generations ----

    async def generate(self, request: ImageGenerationRequest) -> dict:
        width, height = self.size_of(request.size)
        steps = request.num_inference_steps or self.config.num_inference_steps
        if steps > self.config.max_inference_steps:
            message = (
                f"num_inference_steps={steps} is above this model's limit of "
                f"{self.config.max_inference_steps}."
            )
            raise invalid_request(message, param="num_inference_steps")
        if request.n > self.max_images():
            message = f"n={request.n} is more than the {self.max_images()} images {self.name} "
            raise invalid_request(message + "makes per request.", param="n")
        seed = request.seed if request.seed is not None else secrets.randbits(62)
        guidance = request.guidance_scale
        specs = [
            ImageSpec(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt or "",
                seed=seed + i,
                guidance_scale=self.config.guidance_scale if guidance is None else guidance,
            )
            for i in range(request.n)
        ]
        try:
            future = self.engine.submit(specs, width, height, steps)
        except (EngineOverloaded, EngineStopped) as err:
            status = 429 if isinstance(err, EngineOverloaded) else 503
            message = f"{self.name} is overloaded: {err}"
            raise overloaded(message, status, self.retry_after_s) from None
        try:
            images = await asyncio.wrap_future(future)
        except EngineStopped:
            raise overloaded(f"{self.name} is shutting down", 503, self.retry_after_s) from None
        except Exception as err:  # noqa: BLE001 - a failed batch: the client sees a 500
            raise internal_error(f"image generation failed: {type(err).__name__}: {err}") from None
        data = [ImageData(b64_json=png_base64(image)) for image in images]
        return ImagesResponse(created=now(), data=data, size=size_text(width, height)).model_dump()

    def size_of(self, size: str | None) -> tuple[int, int]:
        if size is None or size == "auto":
            return self.native
        if size not in self.sizes:
            served = ", ".join(self.sizes)
            message = f"size={size[:40]!r} is not served by {self.name} (served sizes: {served})."
            raise APIError(400, message, param="size", code="invalid_size")
        return self.sizes[size]


def check_size(size: str, multiple: int) -> tuple[int, int]:
    """(width, height) of a configured extra size; ValueError when the UNet cannot take it."""
    parsed = parse_size(size)
    if parsed is None or parsed[0] % multiple or parsed[1] % multiple:
        raise ValueError(
            f"image_engine.sizes: {size!r} must be WIDTHxHEIGHT with both sides multiples of "
            f"{multiple} (the UNet's downsampling)"
        )
    return parsed


def png_base64(image: np.ndarray) -> str:
    """An H x W x 3 float image in [0, 1] as base64 PNG (rounded as diffusers' numpy_to_pil)."""
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(b64: str) -> np.ndarray:
    """A served image back as H x W x 3 uint8 (for clients, tests and the benchmark)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
