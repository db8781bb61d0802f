"""Model families: presets (presets.py), construction (registry.py), LoRA (lora.py)."""

from fmray.models.presets import PRESETS

__all__ = ["PRESETS"]
