"""fmray command line: one dict of commands -> recipe entry points.

    fmray pretrain --config jobs/pretrain/tiny.yaml train.max_steps=50 zero.stage=3
    fmray pretrain --help                 # every config key with its default and meaning
    fmray tokenizer data.vocab_size=1024 output=my_tokenizer
    fmray export runs/pretrain/checkpoint_00000100 exported/
    fmray sft --config jobs/sft/tiny_lora.yaml
    fmray export runs/sft-tiny-lora/checkpoint_00000200 adapter/ --adapter-only
    fmray tune --config jobs/tune/sft_tiny.yaml
    fmray serve --config jobs/serve/llm_tiny.yaml

Recipe commands take `--config FILE` plus dotted `key.sub=value` overrides, and
`--address ADDR` to run on an existing Ray cluster instead of an embedded local one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fmray.config import ConfigError, describe_config, load_config


@dataclass(frozen=True)
class Recipe:
    """A config-driven command: `module.config_class` validated, then `module.run(config)`."""

    module: str
    config_class: str
    summary: str


@dataclass(frozen=True)
class Tool:
    """A command with its own arguments: `module.function(argv)`."""

    module: str
    function: str
    summary: str


COMMANDS: dict[str, Recipe | Tool] = {
    "pretrain": Recipe("fmray.train.pretrain", "PretrainConfig", "pretrain a causal LM"),
    "tokenizer": Recipe("fmray.data.tokenizer", "TokenizerConfig", "train a BPE tokenizer"),
    "sft": Recipe("fmray.train.sft", "SFTConfig", "instruction fine-tuning (full or LoRA)"),
    "tune": Recipe("fmray.tune.search", "TuneConfig", "Ray Tune search over a recipe's config"),
    "serve": Recipe(
        "fmray.serve.app", "ServeConfig", "serve models behind an OpenAI-compatible API"
    ),
    "export": Tool("fmray.cli", "export_command", "write the HF directory of a checkpoint"),
}


def export_command(argv: list[str]) -> None:
    from fmray.checkpoint import (
        export_adapter_checkpoint,
        export_hf_checkpoint,
        is_adapter_checkpoint,
    )

    parser = argparse.ArgumentParser(prog="fmray export", description=COMMANDS["export"].summary)
    parser.add_argument("checkpoint", help="an fmray checkpoint folder (checkpoint_<step>)")
    parser.add_argument("out", help="HF directory to write")
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA checkpoints: write the peft adapter alone (default: the merged full model)",
    )
    args = parser.parse_args(argv)
    if not (Path(args.checkpoint) / "fmray.json").is_file():
        parser.error(f"checkpoint {args.checkpoint!r} is not an fmray checkpoint (no fmray.json)")
    if is_adapter_checkpoint(args.checkpoint):
        out = export_adapter_checkpoint(args.checkpoint, args.out, merged=not args.adapter_only)
        kind = "peft adapter" if args.adapter_only else "merged LoRA model"
    elif args.adapter_only:
        parser.error(f"--adapter-only: {args.checkpoint} is a full checkpoint, not a LoRA one")
    else:
        out = export_hf_checkpoint(args.checkpoint, args.out)
        kind = "HF model"
    print(f"[fmray] {kind} written to {out.resolve()}")


def run_recipe(name: str, recipe: Recipe, argv: list[str]) -> None:
    module = importlib.import_module(recipe.module)
    config_class = getattr(module, recipe.config_class)
    keys = "\n".join(describe_config(config_class))
    parser = argparse.ArgumentParser(
        prog=f"fmray {name}",
        description=f"{recipe.summary}.\n\nconfig keys (override with key.sub=value):\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    args = parser.parse_args(argv)
    config = load_config(config_class, args.config, args.overrides)
    run: Callable[..., object] = module.run
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
