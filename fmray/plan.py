"""`fmray plan`: per-worker memory of a training run, whether it fits, and the cheapest change
that makes it fit, before any GPU is rented or Ray started.

    fmray plan --config jobs/pretrain/llama_7b.yaml --gpu-memory 80GiB
    fmray plan --config jobs/pretrain/tiny.yaml zero.stage=3 train.micro_batch_size=32   # CPU
    fmray plan --config jobs/ppo/llama_1b.yaml --gpu-memory 141GB
    fmray plan --recipe sft --config my.yaml --model-preset llama-1b   # model.path not here yet

The recipe comes from --recipe, else from the config file's folder (jobs/<recipe>/...). A GPU
config without --gpu-memory or scaling.device_memory is planned for this machine's GPU, else an
80 GiB one. Exit status: 0 fits, 1 does not fit, 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fmray.config import ConfigError, load_config
from fmray.recipes import recipe_config_class

TRAINING_RECIPES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "diffusion")
DEFAULT_GPU = "80GiB"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fmray plan",
        description="Per-worker memory of a training run: parameters, gradients, optimizer "
        "states, activations; whether it fits; the cheapest change that fits.",
    )
    p.add_argument("--config", help="the recipe's YAML config")
    p.add_argument("--recipe", choices=TRAINING_RECIPES, help="default: the config's folder name")
    p.add_argument("--gpu-memory", help="one GPU's memory, e.g. 80GiB, 141GB (GPU configs)")
    p.add_argument(
        "--model-preset", help="size a model.path that is not on this machine as this preset"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. zero.stage=3")
    return p


def recipe_from_path(path: str | None) -> str | None:
    if path is None:
        return None
    folder = Path(path).resolve().parent.name
    return folder if folder in TRAINING_RECIPES else None


def main(argv: list[str]) -> None:
    from fmray.distributed.planner import plan_config

    args = parser().parse_intermixed_args(argv)
    recipe = args.recipe or recipe_from_path(args.config)
    if recipe is None:
        raise ConfigError(
            f"fmray plan: name the recipe with --recipe ({', '.join(TRAINING_RECIPES)}); "
            f"{args.config!r} is not in a jobs/<recipe>/ folder"
        )
    config = load_config(recipe_config_class(recipe), args.config, args.overrides)
    gpu_memory = args.gpu_memory
    if config.scaling.use_gpu and gpu_memory is None and config.scaling.device_memory is None:
        import torch

        gpu_memory = None if torch.cuda.is_available() else DEFAULT_GPU
    plan = plan_config(recipe, config, gpu_memory, args.model_preset)
    if gpu_memory == DEFAULT_GPU and args.gpu_memory is None:
        plan.budget_source = f"no GPU here: assumed {DEFAULT_GPU}, set --gpu-memory"
    print(plan.table())
    if plan.fits is False:
        raise SystemExit(1)
