"""`fmray export`: write the HF directory of an fmray checkpoint (full model or LoRA).

    fmray export runs/pretrain-tiny/checkpoint_00000120 exported/
    fmray export runs/sft-tiny-lora/checkpoint_00000200 adapter/ --adapter-only
    python -m fmray export CHECKPOINT OUT

A LoRA checkpoint exports as the merged full model, or with --adapter-only as a peft adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fmray.recipes import COMMANDS


def main(argv: list[str]) -> None:
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
