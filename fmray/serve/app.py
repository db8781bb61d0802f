"""`fmray serve`: models behind an OpenAI-compatible API on Ray Serve, autoscaled per model.

    fmray serve --config jobs/serve/llm_tiny.yaml                    # embedded local Ray, CPU
    fmray serve --config jobs/serve/llm_tiny.yaml serve.port=8001 autoscaling.max_replicas=2
    fmray serve --config jobs/serve/llm_tiny.yaml --address auto     # a running Ray cluster
    fmray serve --config jobs/serve/image_tiny.yaml                  # a diffusion model: /v1/images
    fmray serve --config jobs/serve/combined_tiny.yaml               # LLM and image model together
    serve run jobs/serve/llm_tiny_app.yaml                           # Serve's own CLI
    serve run fmray.serve.app:build_app config=jobs/serve/llm_tiny.yaml serve.port=8001

The app is one FastAPI ingress (`OpenAIIngress`) plus one deployment per model
(`LLMDeployment` named llm-<model>, `ImageDeployment` named image-<model>), each with its own
replicas, resources and autoscaling.
`build_app(args)` is the import path for `serve run` / `serve deploy` YAML / KubeRay RayService.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import Field, model_validator
from ray.serve import Application

from fmray.config import ConfigError, Section, deep_merge, parse_overrides, read_yaml
from fmray.config import validate_config as _validate
from fmray.serve.config import (
    AutoscalingSection,
    DeploymentSection,
    EngineSection,
    ImageEngineSection,
    ImageModelEntry,
    ModelEntry,
    ModelName,
    ServerSection,
)

API_KEY_ENV = "FMRAY_API_KEY"


class ServeConfig(Section):
    models: dict[ModelName, ModelEntry] = Field(
        default_factory=lambda: {"tiny": ModelEntry(path="runs/pretrain-tiny")}
    )
    """LLMs by request `model` name: models.<name>.path (HF dir or fmray run), .engine..."""
    image_models: dict[ModelName, ImageModelEntry] = {}
    """Image models by request `model` name: image_models.<name>.path (diffusers dir or run)."""
    serve: ServerSection = ServerSection()
    engine: EngineSection = EngineSection()
    image_engine: ImageEngineSection = ImageEngineSection()
    """Engine settings of every image model (batching, default steps and guidance, sizes)."""
    deployment: DeploymentSection = DeploymentSection()
    autoscaling: AutoscalingSection = AutoscalingSection()

    @model_validator(mode="before")
    @classmethod
    def _images_only(cls, data: Any) -> Any:
        """A config that names image models and no `models` serves no LLM (not the default)."""
        if isinstance(data, dict) and data.get("image_models") and "models" not in data:
            return {**data, "models": {}}
        return data

    @model_validator(mode="after")
    def _some_model(self) -> ServeConfig:
        if not self.models and not self.image_models:
            raise ValueError(
                "models is empty: name at least one (models.<name>.path=<HF dir>, or "
                "image_models.<name>.path=<diffusers dir>)"
            )
        both = sorted(set(self.models) & set(self.image_models))
        if both:
            raise ValueError(
                f"image_models.{both[0]} is also in models: a request's `model` names one model"
            )
        return self


def build_application(config: ServeConfig) -> Application:
    """The Serve application: ingress bound to one LLMDeployment / ImageDeployment per model."""
    from fmray.serve.deployment import ImageDeployment, LLMDeployment, deployment_name, llm_options
    from fmray.serve.ingress import OpenAIIngress

    models = {}
    for name, entry in config.models.items():
        deployment = entry.deployment or config.deployment
        autoscaling = entry.autoscaling or config.autoscaling
        engine = entry.engine or config.engine
        models[name] = LLMDeployment.options(
            name=deployment_name(name), **llm_options(deployment, autoscaling)
        ).bind(
            name,
            entry.model_dump(mode="json"),
            engine.model_dump(mode="json"),
            deployment.model_dump(mode="json"),
        )
    image_models = {}
    for name, entry in config.image_models.items():
        deployment = entry.deployment or config.deployment
        autoscaling = entry.autoscaling or config.autoscaling
        image_models[name] = ImageDeployment.options(
            name=deployment_name(name, "image"), **llm_options(deployment, autoscaling)
        ).bind(
            name,
            entry.model_dump(mode="json"),
            (entry.engine or config.image_engine).model_dump(mode="json"),
            deployment.model_dump(mode="json"),
        )
    server = config.serve
    return OpenAIIngress.options(
        num_replicas=server.ingress_replicas,
        ray_actor_options={"num_cpus": server.ingress_num_cpus},
        max_ongoing_requests=10_000,  # it only awaits model replicas; they apply the limits
    ).bind(
        models, server.api_key or os.environ.get(API_KEY_ENV), server.max_body_bytes, image_models
    )


class InProcessAPI:
    """The app's HTTP API with its models in this process, no Ray: the same routes, checks and
    model code as on Serve, for tests and the reliability bench. `close()` stops the engines."""

    def __init__(self, config: ServeConfig) -> None:
        from fmray.serve.deployment import ImageDeployment, LLMDeployment
        from fmray.serve.ingress import InProcessModel, build_api

        self.models = {}
        for name, entry in config.models.items():
            self.models[name] = LLMDeployment.func_or_class(
                name,
                entry.model_dump(mode="json"),
                (entry.engine or config.engine).model_dump(mode="json"),
                (entry.deployment or config.deployment).model_dump(mode="json"),
            )
        self.image_models = {}
        for name, entry in config.image_models.items():
            self.image_models[name] = ImageDeployment.func_or_class(
                name,
                entry.model_dump(mode="json"),
                (entry.engine or config.image_engine).model_dump(mode="json"),
                (entry.deployment or config.deployment).model_dump(mode="json"),
            )
        clients = {name: InProcessModel(model) for name, model in self.models.items()}
        images = {name: InProcessModel(model) for name, model in self.image_models.items()}
        api_key = config.serve.api_key or os.environ.get(API_KEY_ENV)
        self.asgi = build_api(clients, api_key, config.serve.max_body_bytes, images)

    def close(self) -> None:
        for model in [*self.models.values(), *self.image_models.values()]:
            model.server.shutdown(drain_timeout_s=5.0)

    @contextmanager
    def http_server(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve the API over real HTTP (uvicorn, as Serve's proxy) from a thread; yields the
        base URL (port 0: a free one)."""
        import uvicorn

        config = uvicorn.Config(self.asgi, host=host, port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://{host}:{bound}"
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def build_app(args: dict[str, Any]) -> Application:
    """Entry point for `serve run` / `serve deploy` / RayService (`import_path`).

    `args` is a ServeConfig tree; a `config` key names a YAML file to start from, and dotted keys
    (`serve.port: 8001`, as `serve run ... key=value` passes them) override it.
    """
    args = dict(args)
    base = read_yaml(args.pop("config")) if "config" in args else {}
    dotted = [f"{k}={v}" for k, v in args.items() if "." in k and not isinstance(v, dict)]
    nested = {k: v for k, v in args.items() if "." not in k or isinstance(v, dict)}
    data = deep_merge(deep_merge(base, nested), parse_overrides(dotted))
    return build_application(_validate(ServeConfig, data))


def check_model_paths(config: ServeConfig) -> ServeConfig:
    """Fail before Ray starts when a model folder is missing (one line naming the key); return
    the config with absolute paths, which replicas resolve the same from any directory."""
    from fmray import storage
    from fmray.serve.denoise import find_pipeline_dir
    from fmray.serve.loading import PickleWeightsError, find_servable_dir

    models = {}
    for name, entry in config.models.items():
        try:
            find_servable_dir(entry.path)
        except FileNotFoundError as err:
            raise ConfigError(
                f"config error: models.{name}.path={entry.path!r}: {err} "
                "(train one with `fmray pretrain --config jobs/pretrain/tiny.yaml`)"
            ) from None
        except PickleWeightsError as err:
            raise ConfigError(f"config error: models.{name}.path: {err}") from None
        models[name] = entry.model_copy(update={"path": storage.resolve(entry.path)})
    image_models = {}
    for name, entry in config.image_models.items():
        try:
            find_pipeline_dir(entry.path)
        except FileNotFoundError as err:
            raise ConfigError(
                f"config error: image_models.{name}.path={entry.path!r}: {err} "
                "(train one with `fmray diffusion --config jobs/diffusion/tiny.yaml`)"
            ) from None
        image_models[name] = entry.model_copy(update={"path": storage.resolve(entry.path)})
    return config.model_copy(update={"models": models, "image_models": image_models})


def required_cpus(config: ServeConfig) -> float:
    """CPUs the app holds at its largest: every model at max_replicas, plus the ingress."""
    total = config.serve.ingress_num_cpus * config.serve.ingress_replicas
    for entry in [*config.models.values(), *config.image_models.values()]:
        replicas = (entry.autoscaling or config.autoscaling).max_replicas
        total += replicas * (entry.deployment or config.deployment).num_cpus
    return total


def run(config: ServeConfig, address: str | None = None) -> None:
    """Deploy, print how to call it, and serve until Ctrl-C."""
    from ray import serve

    from fmray.distributed.runtime import init_ray

    if address is None:
        config = check_model_paths(config)
    init_ray(address, required_cpus(config))
    server = config.serve
    names = [*config.models, *config.image_models]
    print(f"[fmray] deploying {', '.join(names)} (loading weights into each replica)")
    serve.start(http_options={"host": server.host, "port": server.port})
    serve.run(build_application(config), name=server.app_name, route_prefix=server.route_prefix)
    print_usage(config)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` / a container stop drains like Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[fmray] stopping: draining in-flight requests (Ctrl-C again to force)")
    try:
        serve.delete(server.app_name)  # replicas finish their requests first (graceful_*)
        if address is None:
            serve.shutdown()
        print("[fmray] stopped")
    except (KeyboardInterrupt, Exception) as err:  # noqa: BLE001 - exiting either way
        print(f"[fmray] stopped without draining ({type(err).__name__})")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def print_usage(config: ServeConfig) -> None:
    server = config.serve
    host = "localhost" if server.host in ("0.0.0.0", "127.0.0.1") else server.host
    base = f"http://{host}:{server.port}{server.route_prefix.rstrip('/')}"
    auth = ""
    if server.api_key or os.environ.get(API_KEY_ENV):
        auth = f" -H 'Authorization: Bearer ${API_KEY_ENV}'"
    names = [*config.models, *config.image_models]
    print(f"[fmray] serving {len(names)} model(s): {', '.join(names)}")
    print(f"  OpenAI base URL  {base}/v1   (health: {base}/health)")
    if config.models:
        model = next(iter(config.models))
        body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
        print(f"  try              curl {base}/v1/chat/completions{auth} \\")
        print(f"                     -H 'Content-Type: application/json' -d '{body}'")
    if config.image_models:
        model = next(iter(config.image_models))
        body = f'{{"model": "{model}", "prompt": "a red circle on the left", "seed": 1}}'
        print(f"  images           curl {base}/v1/images/generations{auth} \\")
        print(f"                     -H 'Content-Type: application/json' -d '{body}'")
    print("  stop             Ctrl-C")
