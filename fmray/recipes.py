"""The registry of fmray's commands: one entry per command, read by the CLI and by Tune alike.

    fmray <command> --config FILE key.sub=value      # any Recipe below
    python -m fmray <command> ...                    # the same

A `Recipe` names its module and config class (the module's `run(config)` runs it) and what Tune
may do with it; a `Tool` is a command that parses its own arguments. Modules are imported only
when a command runs, so reading the registry stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from pydantic import BaseModel


@dataclass(frozen=True)
class Recipe:
    """A config-driven command: `module.config_class` validated, then `module.run(config)`."""

    module: str
    config_class: str
    summary: str
    tunable_metrics: tuple[str, ...] = ()
    """Metrics its evaluations report that Tune may optimise (empty: not tunable). A tunable
    module exposes prepare_run(config) -> plan and build_trainer(config, plan)."""
    pbt: bool = False
    """Whether it runs in PBT segments (its plan honours stop_step and resume_from)."""
    path_keys: tuple[str, ...] = ()
    """Config keys holding paths beyond model.path and data.* (Tune makes them absolute)."""


@dataclass(frozen=True)
class Tool:
    """A command with its own arguments: `module.function(argv)`."""

    module: str
    function: str
    summary: str


COMMANDS: dict[str, Recipe | Tool] = {
    "pretrain": Recipe(
        "fmray.train.pretrain",
        "PretrainConfig",
        "pretrain a causal LM",
        tunable_metrics=("val_loss", "loss"),
    ),
    "tokenizer": Recipe("fmray.data.tokenizer", "TokenizerConfig", "train a BPE tokenizer"),
    "sft": Recipe(
        "fmray.train.sft",
        "SFTConfig",
        "instruction fine-tuning (full or LoRA)",
        tunable_metrics=("val_loss", "val_exact_match", "loss"),
        pbt=True,
    ),
    "reward": Recipe(
        "fmray.train.reward",
        "RewardConfig",
        "reward model on preference pairs (Bradley-Terry; full or LoRA)",
        tunable_metrics=("val_loss", "val_accuracy", "val_margin", "loss"),
        pbt=True,
    ),
    "dpo": Recipe(
        "fmray.train.dpo",
        "DPOConfig",
        "direct preference optimisation (sigmoid, cDPO, IPO; full or LoRA)",
        tunable_metrics=("val_loss", "val_accuracy", "val_margin", "val_exact_match", "loss"),
        pbt=True,
        path_keys=("dpo.reference",),
    ),
    "ppo": Recipe(
        "fmray.rl.ppo",
        "PPOConfig",
        "PPO with a critic, GAE and a KL penalty (reward model and/or rule reward)",
        path_keys=("reference", "reward.model", "ppo.critic"),
    ),
    "grpo": Recipe(
        "fmray.rl.grpo",
        "GRPOConfig",
        "GRPO: group-normalised advantages, k3 KL, no critic",
        path_keys=("reference", "reward.model"),
    ),
    "diffusion": Recipe(
        "fmray.train.diffusion",
        "DiffusionConfig",
        "text-to-image diffusion training (pixel or latent UNet)",
        tunable_metrics=("val_loss", "colour_acc", "loss"),
    ),
    "tune": Recipe("fmray.tune.search", "TuneConfig", "Ray Tune search over a recipe's config"),
    "serve": Recipe(
        "fmray.serve.app", "ServeConfig", "serve models behind an OpenAI-compatible API"
    ),
    "export": Tool("fmray.export", "main", "write the HF directory of a checkpoint"),
    "submit": Tool("fmray.ops.submit", "main", "run a command as a job on a Ray cluster"),
    "jobs": Tool("fmray.ops.jobs", "main", "list, follow, inspect or stop a cluster's jobs"),
    "plan": Tool("fmray.plan", "main", "per-worker memory of a training config, and what fits"),
    "report": Tool("fmray.report", "main", "loss and metric curves (PNG) and a summary of runs"),
    "doctor": Tool("fmray.doctor", "main", "check this environment for what breaks a run"),
    "quickstart": Tool("fmray.quickstart", "main", "the lifecycle end to end, with reports"),
}


def get_recipe(name: str) -> Recipe:
    command = COMMANDS.get(name)
    if not isinstance(command, Recipe):
        recipes = ", ".join(recipe_names())
        raise KeyError(f"{name!r} is not a recipe (recipes: {recipes})")
    return command


def recipe_module(name: str) -> ModuleType:
    return importlib.import_module(get_recipe(name).module)


def recipe_config_class(name: str) -> type[BaseModel]:
    return getattr(recipe_module(name), get_recipe(name).config_class)


def recipe_names() -> list[str]:
    return [name for name, command in COMMANDS.items() if isinstance(command, Recipe)]


def tunable_recipes() -> list[str]:
    return [name for name in recipe_names() if get_recipe(name).tunable_metrics]


def pbt_recipes() -> list[str]:
    return [name for name in recipe_names() if get_recipe(name).pbt]
