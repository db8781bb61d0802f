"""OpenAI's images API bodies (pydantic): `POST /v1/images/generations` request and response.

    curl localhost:8000/v1/images/generations -H 'Content-Type: application/json' \
        -d '{"model": "shapes", "prompt": "a red circle on the left", "size": "32x32", "seed": 1}'

OpenAI's fields, plus the extensions diffusion users expect (`num_inference_steps`,
`guidance_scale`, `negative_prompt`, `seed`; the `openai` client sends them through
`extra_body`). Unknown fields are a 400 naming the field; fields OpenAI defines that fmray does
not implement are accepted only at their no-op values. Images come back inline as base64 PNG:
`response_format="url"` is a 400, since fmray keeps no files to link to.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from fmray.serve.schemas import Strict

MAX_IMAGES = 10  # OpenAI's limit on n; a model's max_batch_size may lower it
MAX_PROMPT_CHARS = 4000
SEED_LIMIT = 2**63


class ImageGenerationRequest(Strict):
    model: str
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = None
    """'WIDTHxHEIGHT' among the model's sizes, or 'auto' (the native size)."""
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    quality: Literal["auto", "standard"] | None = None
    style: str | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto"] | None = None
    output_compression: int | None = None
    partial_images: int | None = None
    stream: Literal[False] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    # ---- extensions (send with `extra_body` from the openai client)
    num_inference_steps: int | None = Field(None, ge=1)
    """Denoising steps (default: the model's image_engine.num_inference_steps)."""
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
    """Classifier-free guidance (<= 1: off; default: image_engine.guidance_scale)."""
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    """What the image should not show (the unconditional branch of guidance)."""
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    """Image i of the request uses seed + i: the same seed gives the same images, batched or not."""

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("response_format")
    @classmethod
    def _inline_only(cls, value: str | None) -> str | None:
        if value == "url":
            raise ValueError(
                "response_format='url' is not supported: fmray returns images inline, "
                "use 'b64_json'"
            )
        return value

    @field_validator("style", "output_compression", "partial_images")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported by fmray (leave it unset)")
        return value


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: Literal["png"] = "png"


def parse_size(size: str) -> tuple[int, int] | None:
    """(width, height) of 'WIDTHxHEIGHT', or None when it is not one."""
    width, sep, height = size.partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        return None
    if int(width) <= 0 or int(height) <= 0 or len(width) > 5 or len(height) > 5:
        return None
    return int(width), int(height)


def size_text(width: int, height: int) -> str:
    return f"{width}x{height}"
