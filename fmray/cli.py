"""fmray command line: argument parsing for the commands of the registry in fmray.recipes.

    fmray pretrain --config jobs/pretrain/tiny.yaml train.max_steps=50 zero.stage=3
    fmray pretrain --help                 # every config key with the value a run would use
    fmray sft --config jobs/sft/tiny.yaml --help      # ... with that file's values
    fmray tokenizer data.vocab_size=1024 output=my_tokenizer
    fmray export runs/pretrain/checkpoint_00000100 exported/
    fmray sft --config jobs/sft/tiny_lora.yaml
    fmray export runs/sft-tiny-lora/checkpoint_00000200 adapter/ --adapter-only
    fmray tune --config jobs/tune/sft_tiny.yaml
    fmray serve --config jobs/serve/llm_tiny.yaml
    python -m fmray <command> ...         # the same as `fmray`

Recipe commands take `--config FILE` plus dotted `key.sub=value` overrides, and
`--address ADDR` to run on an existing Ray cluster instead of an embedded local one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from fmray.config import (
    ConfigError,
    ConfigLayer,
    describe_config,
    merge_layers,
    read_layers,
    validate_config,
)
from fmray.recipes import COMMANDS, Recipe, recipe_config_class, recipe_module


def recipe_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    """The recipe command's arguments; without a description, one that leaves --help alone."""
    parser = argparse.ArgumentParser(
        prog=f"fmray {name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=description is not None,
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    return parser


def recipe_help(name: str, recipe: Recipe, layers: list[ConfigLayer]) -> str:
    keys = "\n".join(describe_config(recipe_config_class(name), layers))
    origin = " and ".join(source for source, _ in layers)
    values = f"from {origin}, else the recipe's defaults" if origin else "the recipe's defaults"
    return (
        f"{recipe.summary}.\n\nconfig keys with the values a run would use ({values}); "
        f"override with key.sub=value:\n{keys}"
    )


def run_recipe(name: str, recipe: Recipe, argv: list[str]) -> None:
    # --config and the overrides are read before argparse sees --help, so help shows the values
    # this command line would run with.
    known, _ = recipe_parser(name, None).parse_known_intermixed_args(argv)
    layers = read_layers(known.config, known.overrides)
    parser = recipe_parser(name, recipe_help(name, recipe, layers))
    args = parser.parse_intermixed_args(argv)
    config = validate_config(recipe_config_class(name), merge_layers(layers))
    run: Callable[..., object] = recipe_module(name).run
    if "address" in run.__code__.co_varnames[: run.__code__.co_argcount]:
        run(config, address=args.address)
    else:
        run(config)


def usage() -> str:
    lines = ["usage: fmray <command> [--config FILE] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<12} {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"fmray: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if isinstance(command, Recipe):
            run_recipe(name, command, rest)
        else:
            getattr(importlib.import_module(command.module), command.function)(rest)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
