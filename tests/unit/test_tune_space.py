"""Tune configs: search-space parsing, one-line errors before Ray starts, concurrency, presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmray.config import ConfigError, load_config, validate_config
from fmray.tune import search
from fmray.tune.search import TuneConfig, derive_max_concurrent
from fmray.tune.space import Distribution, apply_params, parse_distribution
from tests.conftest import REPO_ROOT

TUNE_TINY = REPO_ROOT / "jobs" / "tune" / "sft_tiny.yaml"


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("loguniform(1e-5, 1e-3)", Distribution("loguniform", (1e-5, 1e-3))),
        ("uniform(0.0, 0.1)", Distribution("uniform", (0.0, 0.1))),
        ("randint(0, 20)", Distribution("randint", (0, 20))),
        ("choice([4, 8, 16])", Distribution("choice", ([4, 8, 16],))),
        (" grid( [1.0e-3, 3.0e-3] ) ", Distribution("grid", ([1e-3, 3e-3],))),
    ],
)
def test_distributions_parse(expression: str, expected: Distribution) -> None:
    assert parse_distribution("train.lr", expression) == expected


def test_distributions_become_ray_tune_domains() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    assert isinstance(parse_distribution("k", "loguniform(1e-5, 1e-3)").to_tune(), Float)
    assert isinstance(parse_distribution("k", "randint(0, 3)").to_tune(), Integer)
    assert isinstance(parse_distribution("k", "choice([1, 2])").to_tune(), Categorical)
    assert parse_distribution("k", "grid([1, 2])").to_tune() == {"grid_search": [1, 2]}
    assert parse_distribution("k", "randint(0, 3)").extremes() == [0, 2]


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"train.lrr": "uniform(0, 1)"}, "search_space key 'train.lrr' is unknown (allowed under"),
        ({"trainer.lr": "uniform(0, 1)"}, "search_space key 'trainer.lr' is unknown (allowed: run"),
        ({"train": "uniform(0, 1)"}, "search_space key 'train' is a section; name one of its"),
        ({"train.lr": "normal(0, 1)"}, "train.lr='normal(0, 1)' is not a distribution (allowed"),
        ({"train.lr": "loguniform(0, 1e-3)"}, "expected loguniform(low, high) with 0 < low"),
        ({"train.lr": "uniform(1e-3, 1e-5)"}, "expected uniform(low, high) with low < high"),
        ({"train.warmup_steps": "randint(0.5, 3)"}, "expected randint(low, high) with integers"),
        ({"lora.r": "choice([])"}, "expected choice([v1, v2, ...]) with at least one value"),
        ({"lora.r": "choice([4, __import__('os')])"}, "arguments must be literals"),
        ({"train.lr": 0.001}, "train.lr=0.001 is not a distribution"),
        ({}, "search_space is empty"),
    ],
)
def test_bad_search_space_fails_with_one_line(space: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(TuneConfig, {"search_space": space})
    message = str(err.value)
    assert expected in message, message
    assert "\n" not in message
    assert message.startswith("config error: ") and "config error: config error" not in message


def test_scheduler_and_metric_checks() -> None:
    space = {"train.lr": "grid([1e-3, 3e-3])"}
    with pytest.raises(ConfigError, match="pbt cannot mutate grid"):
        validate_config(TuneConfig, {"search_space": space, "scheduler": {"name": "pbt"}})
    with pytest.raises(ConfigError, match="metric='accuracy' is not reported by sft"):
        validate_config(TuneConfig, {"search_space": space, "metric": "accuracy"})
    with pytest.raises(ConfigError, match="recipe='serve' cannot be tuned"):
        validate_config(TuneConfig, {"search_space": space, "recipe": "serve"})


def test_command_line_overrides_of_the_space_stay_dotted() -> None:
    config = load_config(
        TuneConfig,
        TUNE_TINY,
        ["search_space.lora.r=choice([4, 8])", "overrides.train.max_steps=30"],
    )
    assert config.search_space["lora.r"] == "choice([4, 8])"
    assert config.search_space["train.lr"] == "loguniform(1.0e-4, 3.0e-3)"
    assert config.overrides["train.max_steps"] == 30


def rejecting_init_ray(*args: object, **kwargs: object) -> None:
    raise AssertionError("Ray was started before the config was checked")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["search_space.lora.r=choice([0, 4])"], "search_space.lora.r can take 0, which the"),
        (["search_space.train.warmup_steps=randint(-3, 2)"], "train.warmup_steps can take -3"),
        (["scheduler.grace_period=5"], "scheduler.grace_period=5 needs the recipe to evaluate"),
        (["scheduler.grace_period=80"], "must be below train.max_steps=80"),
        (["overrides.model.path=/no/such/model"], "model.path='/no/such/model' is neither"),
        (["overrides.train.lrr=1"], "unknown key train.lrr=1"),
    ],
)
def test_invalid_trial_configs_fail_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, overrides: list[str], expected: str
) -> None:
    import fmray.distributed.runtime as runtime

    monkeypatch.setattr(runtime, "init_ray", rejecting_init_ray)
    monkeypatch.chdir(REPO_ROOT)
    path_override = f"overrides.model.path={tiny_model_dir}"
    config = load_config(TuneConfig, TUNE_TINY, [path_override, *overrides])
    with pytest.raises(ConfigError) as err:
        search.run(config)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_max_concurrent_trials_follow_the_cluster() -> None:
    cpu = {"num_workers": 2, "cpus_per_worker": 1.0, "use_gpu": False}
    assert derive_max_concurrent({"CPU": 6.0}, cpu, 0) == 2
    assert derive_max_concurrent({"CPU": 16.0}, cpu, 0) == 7
    assert derive_max_concurrent({"CPU": 16.0}, cpu, 3) == 3
    assert derive_max_concurrent({"CPU": 2.0}, cpu, 0) == 1  # always at least one
    gpu = {"num_workers": 4, "cpus_per_worker": 8.0, "use_gpu": True}
    assert derive_max_concurrent({"CPU": 192.0, "GPU": 8.0}, gpu, 0) == 2
    assert derive_max_concurrent({"CPU": 192.0, "GPU": 16.0}, gpu, 8) == 4


def test_params_apply_to_null_sections() -> None:
    base = {"lora": None, "train": {"lr": 1.0}}
    tree = apply_params(base, {"lora.r": 8, "train.lr": 0.5})
    assert tree == {"lora": {"r": 8}, "train": {"lr": 0.5}}
    assert base == {"lora": None, "train": {"lr": 1.0}}


def test_every_sft_and_tune_preset_loads() -> None:
    from fmray.recipes import recipe_config_class
    from fmray.train.sft import SFTConfig

    sft_presets = sorted((REPO_ROOT / "jobs" / "sft").glob("*.yaml"))
    tune_presets = sorted((REPO_ROOT / "jobs" / "tune").glob("*.yaml"))
    assert len(sft_presets) >= 2 and len(tune_presets) >= 2
    for path in sft_presets:
        assert load_config(SFTConfig, path).model.path
    for path in tune_presets:
        config = load_config(TuneConfig, path)
        assert config.base is not None and (REPO_ROOT / config.base).is_file()
        # its base is a valid config of its recipe
        assert load_config(recipe_config_class(config.recipe), REPO_ROOT / config.base)
