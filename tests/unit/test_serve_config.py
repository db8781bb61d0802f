"""`fmray serve` config: YAML presets, overrides, errors before Ray, deployment options (no Ray).

python -m pytest -q tests/unit/test_serve_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fmray.cli import main
from fmray.config import ConfigError, load_config, validate_config
from fmray.serve.app import ServeConfig, build_app, build_application, check_model_paths

JOBS = Path(__file__).resolve().parents[2] / "jobs" / "serve"


def serve_files() -> list[Path]:
    return sorted(JOBS.glob("*.yaml"))


def model_deployment(app, name: str):
    return app._bound_deployment.init_args[0][name]._bound_deployment


def test_every_serve_yaml_validates() -> None:
    from ray.serve.schema import ServeDeploySchema

    assert serve_files(), "jobs/serve/ holds the serve presets"
    for path in serve_files():
        data = yaml.safe_load(path.read_text())
        if "applications" in data:  # a Ray Serve config file: each app's args are a ServeConfig
            schema = ServeDeploySchema.model_validate(data)
            for app in schema.applications:
                assert app.import_path == "fmray.serve.app:build_app"
                build_app(app.args)
        else:
            build_application(load_config(ServeConfig, path))


def test_overrides_and_per_model_sections() -> None:
    config = load_config(
        ServeConfig,
        JOBS / "llm_tiny.yaml",
        [
            "models.tiny.path=/models/a",
            "models.big/one.path=/models/b",
            "models.big/one.deployment.num_gpus=1",
            "models.big/one.autoscaling.max_replicas=4",
            "serve.port=8001",
        ],
    )
    app = build_application(config)
    tiny, big = model_deployment(app, "tiny"), model_deployment(app, "big/one")
    assert big.name == "llm-big_one"
    assert big.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert big._deployment_config.autoscaling_config.max_replicas == 4
    assert tiny._deployment_config.autoscaling_config.max_replicas == 2  # from the YAML
    assert tiny.max_ongoing_requests == 64 and tiny.max_queued_requests == 128
    assert tiny._deployment_config.autoscaling_config.upscale_delay_s == 10
    assert config.serve.port == 8001


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"serve": {"prot": 1}}, "serve.prot"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling.max_replicas=2"),
        ({"models": {}}, "models"),
        ({"models": {"bad name!": {"path": "x"}}}, "models"),
        ({"models": {"m": {"path": "x", "engine": {"max_batch_size": 0}}}}, "models.m.engine"),
        ({"serve": {"route_prefix": "v1"}}, "serve.route_prefix"),
    ],
)
def test_config_errors_name_the_key(data: dict, names: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(ServeConfig, data)
    assert names in str(info.value) and "\n" not in str(info.value)


def test_build_app_takes_serve_run_arguments(tiny_model_dir: Path) -> None:
    """`serve run fmray.serve.app:build_app config=... key.sub=value` passes flat strings."""
    app = build_app(
        {
            "config": str(JOBS / "llm_tiny.yaml"),
            "models.tiny.path": str(tiny_model_dir),
            "deployment.max_queued_requests": "7",
        }
    )
    assert model_deployment(app, "tiny").max_queued_requests == 7
    with pytest.raises(ConfigError):
        build_app({"deployment.max_queued_requests": "many"})


def test_missing_model_fails_before_ray(tmp_path: Path, capsys, monkeypatch) -> None:
    import fmray.distributed.runtime

    def no_ray(*args, **kwargs) -> None:
        raise AssertionError("Ray was started for a config that cannot work")

    # Ray may already run in this session (the Ray tests' cluster): check that it is not asked.
    monkeypatch.setattr(fmray.distributed.runtime, "init_ray", no_ray)
    with pytest.raises(ConfigError, match=r"models\.tiny\.path"):
        check_model_paths(
            validate_config(ServeConfig, {"models": {"tiny": {"path": str(tmp_path)}}})
        )
    with pytest.raises(SystemExit) as info:
        main(["serve", "--config", str(JOBS / "llm_tiny.yaml"), f"models.tiny.path={tmp_path}"])
    assert info.value.code == 2
    assert "models.tiny.path" in capsys.readouterr().err


def test_help_lists_every_key(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for key in (
        "models",
        "serve.api_key",
        "engine.max_batch_size",
        "deployment.num_gpus",
        "deployment.max_queued_requests",
        "autoscaling.target_ongoing_requests",
    ):
        assert f"  {key} (" in out


def test_local_model_paths_become_absolute(tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(tiny_model_dir.parent)
    config = validate_config(ServeConfig, {"models": {"m": {"path": tiny_model_dir.name}}})
    checked = check_model_paths(config)
    assert checked.models["m"].path == str(tiny_model_dir.resolve())
