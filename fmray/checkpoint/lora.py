"""Kind `lora`: LoRA adapters on a frozen base, exported as peft's adapter directory (adapter/)
and, with weights, as the merged full model (hf/).

The DeepSpeed state holds the adapters and their optimizer only; the base comes back from the
model folder recorded as `base_model` in fmray.json (local or in the run's storage).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fmray import storage
from fmray.checkpoint.exporters import copy_tokenizer_files, partial_dir, publish_export
from fmray.checkpoint.format import gather_state_dict, rank_and_world, read_meta, save_hf_weights

ADAPTER_DIR = "adapter"
HF_DIR = "hf"


def lora_scale(peft_model: Any) -> float:
    from fmray.models.lora import ADAPTER

    config = peft_model.peft_config[ADAPTER]
    return config.lora_alpha / config.r


class LoraExporter:
    kind = "lora"
    has_adapter = True
    """`fmray export --adapter-only` writes the peft adapter alone."""

    def load_base(self, model_dir: Path, ckpt_dir: Path) -> Any:
        """The frozen base the adapters were trained on (a subclass for another head changes
        it)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(model_dir))

    def write_live(
        self, engine: Any, ckpt_dir: Path, tokenizer: Any, meta: dict[str, Any], weights: bool
    ) -> None:
        from fmray.models.lora import merged_state_dict, save_adapter

        state = gather_state_dict(engine, trainable_only=not weights)
        rank, _ = rank_and_world()
        if rank != 0:
            return
        assert state is not None
        save_adapter(engine.module, state, ckpt_dir / ADAPTER_DIR, meta.get("base_model"))
        base = engine.module.get_base_model()
        hf_dir = ckpt_dir / HF_DIR
        base.config.architectures = [type(base).__name__]  # as save_pretrained records it
        base.config.save_pretrained(str(hf_dir))
        if base.can_generate():
            base.generation_config.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))
        if weights:
            save_hf_weights(merged_state_dict(state, lora_scale(engine.module)), hf_dir)

    def export(self, ckpt_dir: Path, out_dir: Path, adapter_only: bool) -> Path:
        """The peft adapter alone, or the base with the adapter folded in by peft's
        `merge_and_unload`; both carry the tokenizer and its chat template."""
        from peft import PeftModel

        if not (ckpt_dir / ADAPTER_DIR / "adapter_config.json").is_file():
            raise ValueError(f"{ckpt_dir} is not a LoRA checkpoint (no {ADAPTER_DIR}/)")
        tmp_dir = partial_dir(out_dir)
        if adapter_only:
            shutil.copytree(ckpt_dir / ADAPTER_DIR, tmp_dir)
        else:
            base_location = read_meta(ckpt_dir)["base_model"]
            scratch = tempfile.mkdtemp(prefix="fmray-base-")
            try:
                base = self.load_base(storage.local_copy(base_location, scratch), ckpt_dir)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            model = PeftModel.from_pretrained(base, str(ckpt_dir / ADAPTER_DIR))
            model.merge_and_unload().save_pretrained(str(tmp_dir))
        extra = () if adapter_only else ("generation_config.json",)
        copy_tokenizer_files(
            ckpt_dir / HF_DIR,
            tmp_dir,
            tuple(name for name in extra if (ckpt_dir / HF_DIR / name).is_file()),
        )
        return publish_export(tmp_dir, out_dir)
