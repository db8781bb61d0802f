"""The recipe registry: one entry per command, read by the CLI and by Tune."""

from __future__ import annotations

import pytest

from fmray.config import ConfigError, validate_config
from fmray.recipes import (
    COMMANDS,
    Tool,
    get_recipe,
    pbt_recipes,
    recipe_config_class,
    tunable_recipes,
)
from tests.conftest import REPO_ROOT


def test_registry_names_each_recipes_config_and_tune_abilities() -> None:
    assert recipe_config_class("sft").__name__ == "SFTConfig"
    assert recipe_config_class("pretrain").__name__ == "PretrainConfig"
    assert get_recipe("sft").tunable_metrics == ("val_loss", "val_exact_match", "loss")
    assert get_recipe("pretrain").tunable_metrics == ("val_loss", "loss")
    assert tunable_recipes()[:4] == ["pretrain", "sft", "reward", "dpo"]
    assert pbt_recipes()[:3] == ["sft", "reward", "dpo"]
    assert recipe_config_class("dpo").__name__ == "DPOConfig"
    assert get_recipe("dpo").path_keys == ("dpo.reference",)
    assert isinstance(COMMANDS["export"], Tool)
    with pytest.raises(KeyError, match="'export' is not a recipe"):
        get_recipe("export")


def test_tune_errors_list_what_the_registry_allows() -> None:
    from fmray.tune.search import TuneConfig

    space = {"train.lr": "loguniform(1e-4, 1e-3)"}
    with pytest.raises(
        ConfigError, match=r"recipe='tokenizer' cannot be tuned \(allowed: pretrain, sft, reward"
    ):
        validate_config(TuneConfig, {"search_space": space, "recipe": "tokenizer"})
    pbt = {
        "search_space": space,
        "recipe": "pretrain",
        "metric": "loss",
        "scheduler": {"name": "pbt"},
    }
    with pytest.raises(
        ConfigError, match=r"scheduler.name=pbt needs .*\(allowed: sft, reward, dpo"
    ):
        validate_config(TuneConfig, pbt)


def test_only_the_entry_points_import_the_cli() -> None:
    package = REPO_ROOT / "fmray"
    importers = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if "fmray.cli" in path.read_text() and path.name not in ("cli.py", "__main__.py")
    ]
    assert importers == []
