"""Model registry: Llama-family presets by name, or any local HF causal-LM directory."""

from fmray.models.registry import PRESETS, build_causal_lm, preset_config

__all__ = ["PRESETS", "build_causal_lm", "preset_config"]
