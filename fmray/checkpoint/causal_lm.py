"""Kind `causal_lm`: a full causal LM exported as an HF directory (safetensors, config,
generation config, tokenizer with its chat template) that stock transformers loads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from fmray.checkpoint.exporters import copy_tokenizer_files, partial_dir, publish_export
from fmray.checkpoint.format import (
    consolidated_state_dict,
    gather_state_dict,
    module_names,
    rank_and_world,
    read_meta,
)

HF_DIR = "hf"


class CausalLMExporter:
    kind = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    """transformers Auto class that loads the export (a subclass for another head changes it)."""

    def write_live(
        self, engine: Any, ckpt_dir: Path, tokenizer: Any, meta: dict[str, Any], weights: bool
    ) -> None:
        state = gather_state_dict(engine) if weights else None
        rank, _ = rank_and_world()
        if rank != 0:
            return
        hf_dir = ckpt_dir / HF_DIR
        model = engine.module
        if state is not None:
            model.save_pretrained(str(hf_dir), state_dict=state)
        else:
            model.config.save_pretrained(str(hf_dir))
            if model.can_generate():
                model.generation_config.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))

    def export(self, ckpt_dir: Path, out_dir: Path, adapter_only: bool) -> Path:
        """Weights consolidated to fp32 from the DeepSpeed files (any ZeRO stage), so this works
        whether or not the checkpoint carries its own weights in hf/."""
        import transformers

        if adapter_only:
            raise ValueError(f"--adapter-only: {ckpt_dir} is a full checkpoint, not a LoRA one")
        meta = read_meta(ckpt_dir)
        state_dict = consolidated_state_dict(
            ckpt_dir, meta.get("export_module") or module_names(meta)[0]
        )
        config = transformers.AutoConfig.from_pretrained(str(ckpt_dir / HF_DIR))
        with torch.device("meta"):
            auto_class = getattr(transformers, self.auto_class)
            model = auto_class.from_config(config, dtype=torch.float32)
        model.load_state_dict(state_dict, assign=True, strict=False)
        tmp_dir = partial_dir(out_dir)
        model.save_pretrained(str(tmp_dir), state_dict=state_dict)
        copy_tokenizer_files(ckpt_dir / HF_DIR, tmp_dir, ("special_tokens_map.json",))
        generation = ckpt_dir / HF_DIR / "generation_config.json"
        if generation.is_file():  # stop tokens set in training (sft: end of turn)
            shutil.copy2(generation, tmp_dir / generation.name)
        return publish_export(tmp_dir, out_dir)
