"""`fmray export`: write the export of an fmray checkpoint, picked by its kind.

    fmray export runs/pretrain-tiny/checkpoint_00000120 exported/              # HF causal LM
    fmray export runs/sft-tiny-lora/checkpoint_00000200 merged/                # LoRA, merged
    fmray export runs/sft-tiny-lora/checkpoint_00000200 adapter/ --adapter-only   # peft adapter
    python -m fmray export s3://bucket/runs/pretrain/checkpoint_00000120 exported/

The checkpoint may be local or in remote storage; the export is written locally and appears
whole (it is built beside the target and renamed into place).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fmray.recipes import COMMANDS

KIND_NAMES = {
    "causal_lm": "HF causal LM",
    "lora": "merged LoRA model",
    "reward": "reward model (AutoModelForSequenceClassification)",
    "reward_lora": "merged LoRA reward model (AutoModelForSequenceClassification)",
}


def main(argv: list[str]) -> None:
    from fmray import storage
    from fmray.checkpoint import export_checkpoint, kind_of, read_meta
    from fmray.checkpoint.exporters import exporter_for

    parser = argparse.ArgumentParser(prog="fmray export", description=COMMANDS["export"].summary)
    parser.add_argument("checkpoint", help="an fmray checkpoint folder (checkpoint_<step>)")
    parser.add_argument("out", help="folder to write")
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA checkpoints: write the peft adapter alone (default: the merged full model)",
    )
    args = parser.parse_args(argv)
    location = storage.resolve(args.checkpoint)
    try:
        kind = kind_of(read_meta(location))
    except ValueError as err:
        parser.error(str(err))
    if args.adapter_only and not getattr(exporter_for(kind), "has_adapter", False):
        parser.error(f"--adapter-only: {args.checkpoint} is a {kind!r} checkpoint, not a LoRA one")
    print(f"[fmray] exporting {location} (kind {kind})")
    out = export_checkpoint(location, Path(args.out), adapter_only=args.adapter_only)
    what = "peft adapter" if args.adapter_only else KIND_NAMES.get(kind, kind)
    print(f"[fmray] {what} written to {out.resolve()}")
