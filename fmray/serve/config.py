"""Config sections of `fmray serve`: models, HTTP front door, engine, replicas, autoscaling.

    fmray serve --help                     # every key with its default and meaning
    fmray serve --config jobs/serve/llm_tiny.yaml serve.port=8001 autoscaling.max_replicas=4

`engine`, `deployment` and `autoscaling` apply to every model; a model entry may carry its own
copy of any of them (e.g. a large model that needs a GPU and more replicas).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from fmray.config import Section

ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]


class EngineSection(Section):
    max_batch_size: int = Field(16, ge=1, le=1024)
    """Sequences decoded together in one forward pass (the continuous batch)."""
    max_waiting: int = Field(64, ge=0)
    """Sequences queued for a batch slot per replica; beyond it: 429 with Retry-After."""
    max_prefill_tokens: int = Field(4096, ge=1)
    """Padded prompt tokens prefilled per engine step (bounds how long joiners pause the batch)."""
    max_model_len: int | None = Field(None, ge=2)
    """Context window in tokens (default: the model config's max_position_embeddings)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: auto is float32 on CPU and bfloat16 on GPU."""
    stall_timeout_s: float = Field(120.0, gt=0.0)
    """check_health fails when the engine thread makes no progress for this long."""


class DeploymentSection(Section):
    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs per model replica (also torch's thread count on CPU)."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per model replica (0: run on CPU)."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests a replica works on at once; they share its engine's batch."""
    max_queued_requests: int = Field(128, ge=-1)
    """Requests waiting for a replica (-1: unbounded); beyond it: 503 with Retry-After."""
    retry_after_s: float = Field(1.0, ge=0.0)
    """Retry-After seconds sent with 503 / 429 overload answers."""
    health_check_period_s: float = Field(10.0, gt=0.0)
    """How often Serve calls the replica's check_health."""
    health_check_timeout_s: float = Field(30.0, gt=0.0)
    """A check_health slower than this marks the replica unhealthy."""
    graceful_shutdown_wait_loop_s: float = Field(2.0, gt=0.0)
    """While stopping, how often Serve checks whether the replica's requests have drained."""
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0.0)
    """Longest wait for in-flight requests before a stopping replica is killed."""


class AutoscalingSection(Section):
    min_replicas: int = Field(1, ge=0)
    """Fewest replicas per model (0 allows scale to zero, at a cold-start cost)."""
    max_replicas: int = Field(1, ge=1)
    """Most replicas per model."""
    initial_replicas: int | None = Field(None, ge=0)
    """Replicas at deploy time (default: min_replicas)."""
    target_ongoing_requests: float = Field(8.0, gt=0.0)
    """Ongoing requests per replica Serve steers towards; batching makes ~batch/2 efficient."""
    upscale_delay_s: float = Field(30.0, ge=0.0)
    """Load must stay above target this long before a replica is added."""
    downscale_delay_s: float = Field(300.0, ge=0.0)
    """Load must stay below target this long before a replica is removed."""
    look_back_period_s: float = Field(30.0, gt=0.0)
    """Window over which ongoing requests are averaged."""
    metrics_interval_s: float | None = Field(None, gt=0.0)
    """How often replicas report load (default: Serve's; lower it for demos and tests only)."""

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSection:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling.max_replicas={self.max_replicas} is below "
                f"autoscaling.min_replicas={self.min_replicas}"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"autoscaling.initial_replicas={initial} must lie in "
                f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class ModelEntry(Section):
    path: str
    """HF causal-LM directory, or an fmray run / checkpoint folder (newest hf/ export is used)."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the model's)."""
    engine: EngineSection | None = None
    """This model's engine settings (default: the top-level engine section)."""
    deployment: DeploymentSection | None = None
    """This model's replica settings (default: the top-level deployment section)."""
    autoscaling: AutoscalingSection | None = None
    """This model's autoscaling (default: the top-level autoscaling section)."""


class ServerSection(Section):
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on (0.0.0.0 to accept other machines)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of the Serve proxy."""
    app_name: str = "fmray-llm"
    """Serve application name."""
    route_prefix: str = "/"
    """URL prefix of the app (the OpenAI base URL is <prefix>/v1)."""
    api_key: str | None = Field(None, json_schema_extra={"secret": True})
    """Require `Authorization: Bearer <api_key>` on /v1/* (default: $FMRAY_API_KEY if set)."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest accepted request body; larger ones get 413."""
    ingress_replicas: int = Field(1, ge=1)
    """Replicas of the HTTP ingress (parsing, auth, routing; no model weights)."""
    ingress_num_cpus: float = Field(0.1, ge=0.0)
    """CPUs reserved per ingress replica."""

    @model_validator(mode="after")
    def _prefix(self) -> ServerSection:
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix={self.route_prefix!r} must start with '/'")
        return self


SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"


class ImageEngineSection(Section):
    max_batch_size: int = Field(8, ge=1, le=256)
    """Images denoised together in one loop (requests with the same size and steps share it)."""
    max_waiting: int = Field(64, ge=0)
    """Images queued for a batch per replica; beyond it: 429 with Retry-After."""
    batch_wait_s: float = Field(0.01, ge=0.0, le=10.0)
    """How long a new batch waits for more requests to join before its loop starts."""
    num_inference_steps: int = Field(20, ge=1)
    """Denoising steps of a request that does not set num_inference_steps."""
    max_inference_steps: int = Field(100, ge=1)
    """Largest num_inference_steps a request may ask for (bounds one batch's time)."""
    guidance_scale: float = Field(4.0, ge=0.0)
    """Classifier-free guidance of a request that does not set guidance_scale (<= 1: off)."""
    sizes: list[str] = []
    """Sizes ('WxH') served besides the model's native one; each must suit the UNet's strides."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: auto is float32 on CPU and float16 on GPU."""
    stall_timeout_s: float = Field(300.0, gt=0.0)
    """check_health fails when one denoising loop runs longer than this."""

    @field_validator("sizes")
    @classmethod
    def _size_form(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            if not re.fullmatch(SIZE_PATTERN, size):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT (e.g. 64x64)")
        return sizes

    @model_validator(mode="after")
    def _steps(self) -> ImageEngineSection:
        if self.num_inference_steps > self.max_inference_steps:
            raise ValueError(
                f"num_inference_steps={self.num_inference_steps} is above "
                f"max_inference_steps={self.max_inference_steps}"
            )
        return self


class ImageModelEntry(Section):
    path: str
    """Diffusers pipeline directory, or an fmray diffusion run / checkpoint (newest pipeline/)."""
    engine: ImageEngineSection | None = None
    """This model's engine settings (default: the top-level image_engine section)."""
    deployment: DeploymentSection | None = None
    """This model's replica settings (default: the top-level deployment section)."""
    autoscaling: AutoscalingSection | None = None
    """This model's autoscaling (default: the top-level autoscaling section)."""
