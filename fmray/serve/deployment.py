"""The per-model Serve deployments: each replica owns one model and its batching engine
(`LLMDeployment`: continuous batching of tokens; `ImageDeployment`: one denoising loop for the
concurrent image requests of a size and step count).

    fmray serve --config jobs/serve/llm_tiny.yaml           # one LLMDeployment per model
    fmray serve --config jobs/serve/image_tiny.yaml         # one ImageDeployment per image model
    serve status                                            # replicas of llm-<model>, image-<model>

The ingress calls it through a DeploymentHandle, so Serve's `max_ongoing_requests`,
`max_queued_requests` (-> BackPressureError -> 503 + Retry-After) and autoscaling on ongoing
requests all act per model. Many requests per replica are the point: they share decode steps.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from fmray.serve.config import (
    AutoscalingSection,
    DeploymentSection,
    EngineSection,
    ImageEngineSection,
    ImageModelEntry,
    ModelEntry,
)
from fmray.serve.errors import APIError
from fmray.serve.image_schemas import ImageGenerationRequest
from fmray.serve.images import ImageServer
from fmray.serve.llm import LLMServer, set_torch_threads
from fmray.serve.schemas import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


@serve.deployment
class LLMDeployment:
    def __init__(self, name: str, entry: dict[str, Any], engine: dict, deployment: dict) -> None:
        model = ModelEntry.model_validate(entry)
        replica = DeploymentSection.model_validate(deployment)
        set_torch_threads(replica.num_cpus)
        self.drain_timeout_s = replica.graceful_shutdown_timeout_s
        self.server = LLMServer.load(
            name,
            model.path,
            model.tokenizer,
            EngineSection.model_validate(engine),
            num_gpus=replica.num_gpus,
            retry_after_s=replica.retry_after_s,
        ).start()
        logger.info("serving %s from %s", name, self.server.model_dir)

    # Client errors come back as APIError *values*: raising would make Serve log a traceback
    # for every malformed request and wrap the error in RayTaskError on the way back.

    async def completions(self, request: CompletionRequest) -> dict | APIError:
        try:
            return await self.server.completion(request)
        except APIError as err:
            return err

    async def completions_stream(self, request: CompletionRequest) -> AsyncIterator[str | APIError]:
        async for item in _errors_as_values(self.server.completion_stream(request)):
            yield item

    async def chat(self, request: ChatCompletionRequest) -> dict | APIError:
        try:
            return await self.server.chat(request)
        except APIError as err:
            return err

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[str | APIError]:
        async for item in _errors_as_values(self.server.chat_stream(request)):
            yield item

    def card(self) -> dict:
        return self.server.card().model_dump()

    def ping(self) -> dict:
        """Liveness plus load, for the ingress's /health."""
        self.server.engine.check_health()
        return {"replica": _replica_id(), **self.server.engine.stats()}

    def check_health(self) -> None:
        """Serve restarts the replica when this raises (engine thread dead or stalled)."""
        self.server.engine.check_health()

    def __del__(self) -> None:
        # Serve has already drained routed requests (graceful_shutdown_*); stop the engine thread.
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown(drain_timeout_s=min(self.drain_timeout_s, 10.0))


@serve.deployment
class ImageDeployment:
    def __init__(self, name: str, entry: dict[str, Any], engine: dict, deployment: dict) -> None:
        model = ImageModelEntry.model_validate(entry)
        replica = DeploymentSection.model_validate(deployment)
        set_torch_threads(replica.num_cpus)
        self.drain_timeout_s = replica.graceful_shutdown_timeout_s
        self.server = ImageServer.load(
            name,
            model.path,
            ImageEngineSection.model_validate(engine),
            num_gpus=replica.num_gpus,
            retry_after_s=replica.retry_after_s,
        ).start()
        logger.info("serving image model %s from %s", name, self.server.model_dir)

    async def images(self, request: ImageGenerationRequest) -> dict | APIError:
        try:
            return await self.server.generate(request)
        except APIError as err:  # a value, as LLMDeployment's client errors
            return err

    def card(self) -> dict:
        return self.server.card().model_dump()

    def ping(self) -> dict:
        """Liveness plus load, for the ingress's /health."""
        self.server.engine.check_health()
        return {"replica": _replica_id(), **self.server.engine.stats()}

    def check_health(self) -> None:
        """Serve restarts the replica when this raises (engine thread dead or a loop stalled)."""
        self.server.engine.check_health()

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown(drain_timeout_s=min(self.drain_timeout_s, 10.0))


async def _errors_as_values(chunks: AsyncIterator[str]) -> AsyncIterator[str | APIError]:
    async with aclosing(chunks):  # type: ignore[type-var]
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as err:
            yield err


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # the class used in-process (tests, bench), not as a replica
        return "in-process"


def deployment_name(model: str, kind: str = "llm") -> str:
    """A Serve deployment name for a model name (which may hold '/', ':' or '.'): llm-<model>,
    or image-<model> for kind "image"."""
    return f"{kind}-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in model)


def llm_options(deployment: DeploymentSection, autoscaling: AutoscalingSection) -> dict[str, Any]:
    """`.options()` of one model's deployment, from its config sections."""
    return {
        "ray_actor_options": {"num_cpus": deployment.num_cpus, "num_gpus": deployment.num_gpus},
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "max_queued_requests": deployment.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": deployment.retry_after_s},
        "autoscaling_config": autoscaling.model_dump(exclude_none=True),
        "health_check_period_s": deployment.health_check_period_s,
        "health_check_timeout_s": deployment.health_check_timeout_s,
        "graceful_shutdown_wait_loop_s": deployment.graceful_shutdown_wait_loop_s,
        "graceful_shutdown_timeout_s": deployment.graceful_shutdown_timeout_s,
    }
