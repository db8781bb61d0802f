"""What a training run holds in memory, read from its recipe config before anything starts:
the models (parameters, trainable parameters, engine or plain module) and the bytes of the
activations one micro-batch keeps for backward. fmray.distributed.planner turns it into
per-device bytes.

    fmray plan --config jobs/ppo/tiny.yaml          # reads the config through this module

Models are sized exactly from the config the recipe would build (a preset, a local HF or
diffusers folder), instantiated on torch's meta device: shapes only, no memory, no weights.
A `model.path` that is not on this machine (a run a later job will write) is sized as the
preset its name contains (`runs/sft-llama-1b` -> llama-1b), or the preset given explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmray.config import ConfigError

# DeepSpeed ZeRO-3 keeps parameters with fewer elements than this whole on every rank
# (stage3_param_persistence_threshold, default 1e5).
PERSISTENCE_THRESHOLD = 100_000
# The vocabulary a preset gets when no tokenizer says otherwise: fmray's own BPE default for
# the CPU presets, a Llama-2-sized one for the GPU presets (the jobs/ files use 32000).
SMALL_PRESETS = ("tiny", "small")
DEFAULT_LARGE_VOCAB = 32000
# Public architectures a path may name that fmray has no preset for (Llama 3's shapes), so a
# config pointing at a model folder on a cluster can be planned from a laptop.
PUBLIC_SHAPES: dict[str, dict[str, Any]] = {
    "llama-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, vocab_size=128256,
    ),
    "llama-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=8192, vocab_size=128256,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class LMShape:
    """The dimensions of a decoder-only transformer that its activations depend on."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    """Output width: the vocabulary for a causal LM, 1 for a reward/value head."""

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.num_heads * self.num_kv_heads


@dataclass(frozen=True)
class ModelPart:
    """One model a worker holds."""

    name: str
    num_params: int
    num_trainable: int
    """0: frozen (an inference engine or a plain module)."""
    engine: bool = True
    """A DeepSpeed engine (ZeRO-3 partitions it); False: a plain module whole on every rank."""
    ema: bool = False
    """Keeps an fp32 moving average of its trainable weights, whole on every rank."""
    fp32: bool = False
    """A plain module kept in fp32 whatever train.bf16 says (diffusion's VAE, text encoder)."""
    num_persistent: int = 0
    """Elements in parameters below ZeRO-3's persistence threshold (kept whole on every rank)."""
    largest_module: int = 0
    """Elements of its largest leaf module: what ZeRO-3 gathers at once, beside the prefetch."""


@dataclass
class Workload:
    """A recipe's models and its activation model: activations(micro_batch, checkpointing,
    bf16) -> bytes per worker at the peak of a step."""

    recipe: str
    parts: list[ModelPart]
    activations: Callable[[int, bool, bool], int]
    activation_note: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- activations


def lm_activation_bytes(
    shape: LMShape, num_sequences: int, seq_len: int, checkpointing: bool, bf16: bool
) -> int:
    """Bytes an HF Llama-style decoder keeps for backward (SDPA attention, no mask).

    Per token and layer, with b bytes per activation element (2 in bf16, 4 in fp32): each of
    the two RMSNorms keeps its fp32 input (4h), its normalised value and its output (2bh);
    attention keeps q and k after RoPE and v (b(h + 2kv), GQA's k and v unexpanded), its
    output, which o_proj reads (bh), and a logsumexp per head (4 B); RoPE keeps only cos and
    sin; the SwiGLU MLP keeps gate, SiLU(gate), up and their product (4bi). Outside the layers:
    the logits (bV), their fp32 log-softmax and its gradient in backward (8V). With gradient
    checkpointing only each layer's input (bh) stays, plus one layer recomputed at a time.
    Checked against the tensors autograd saves for the tiny preset (tests/unit/test_planner.py).
    """
    b = 2 if bf16 else 4
    h, kv, i, vocab = shape.hidden, shape.kv_dim, shape.intermediate, shape.vocab
    norm = 4 * h + 2 * b * h + 4
    layer = 2 * norm + b * (2 * h + 2 * kv + 4 * i) + 4 * shape.num_heads
    head = norm + b * vocab + 8 * vocab
    if checkpointing:
        per_token = shape.num_layers * b * h + layer + head
    else:
        per_token = shape.num_layers * layer + head
    return num_sequences * seq_len * per_token


def kv_cache_bytes(shape: LMShape, num_sequences: int, seq_len: int, bf16: bool) -> int:
    """The rollout engine's KV cache: keys and values of every layer for every position."""
    b = 2 if bf16 else 4
    return num_sequences * seq_len * shape.num_layers * 2 * shape.kv_dim * b


# ----------------------------------------------------------------------------- model sizing


def _meta_stats(model: Any) -> tuple[int, int, int]:
    """(parameters, elements in persistent-size parameters, largest leaf module) of a model."""
    sizes = [p.numel() for p in model.parameters()]
    largest = 0
    for module in model.modules():
        if not list(module.children()):
            largest = max(largest, sum(p.numel() for p in module.parameters(recurse=False)))
    persistent = sum(n for n in sizes if n < PERSISTENCE_THRESHOLD)
    return sum(sizes), persistent, largest


def lora_param_count(model: Any, targets: list[str], r: int) -> int:
    """LoRA adapter elements: r x (in + out) for each Linear whose name ends with a target."""
    import torch

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
            name == t or name.endswith("." + t) for t in targets
        ):
            count += r * (module.in_features + module.out_features)
    return count


def llama_tensor_sizes(config: Any, head: str) -> dict[str, list[int]] | None:
    """Parameter sizes of a Llama-layout model by module kind, from its config alone (no
    transformers modeling import on the driver); None for any other layout."""
    if getattr(config, "model_type", None) != "llama" or getattr(config, "attention_bias", False):
        return None
    if getattr(config, "mlp_bias", False):
        return None
    h, i, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    layers = config.num_hidden_layers
    sizes = {
        "q_proj": [h * q] * layers, "k_proj": [h * kv] * layers, "v_proj": [h * kv] * layers,
        "o_proj": [q * h] * layers, "gate_proj": [h * i] * layers, "up_proj": [h * i] * layers,
        "down_proj": [i * h] * layers, "norm": [h] * (2 * layers + 1), "embed_tokens": [vocab * h],
    }  # fmt: skip
    tied = head == "lm" and getattr(config, "tie_word_embeddings", False)
    sizes["lm_head" if head == "lm" else "score"] = (
        [] if tied else [h * (vocab if head == "lm" else 1)]
    )
    return sizes


LINEAR_SHAPES = {  # (in, out) of each Llama projection, as functions of (h, q, kv, i)
    "q_proj": lambda h, q, kv, i: (h, q), "k_proj": lambda h, q, kv, i: (h, kv),
    "v_proj": lambda h, q, kv, i: (h, kv), "o_proj": lambda h, q, kv, i: (q, h),
    "gate_proj": lambda h, q, kv, i: (h, i), "up_proj": lambda h, q, kv, i: (h, i),
    "down_proj": lambda h, q, kv, i: (i, h),
}  # fmt: skip


def llama_lora_count(config: Any, targets: list[str], r: int) -> int | None:
    """LoRA elements on a Llama layout, or None when a target is not one of its projections."""
    if any(t not in LINEAR_SHAPES for t in targets):
        return None
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    per_layer = sum(r * sum(LINEAR_SHAPES[t](h, q, kv, i)) for t in targets)
    return per_layer * config.num_hidden_layers


def lm_part(
    name: str, hf_config: Any, head: str, trainable: bool, lora: Any = None
) -> tuple[ModelPart, LMShape]:
    """A causal LM ('lm') or a sequence classifier with one output ('score') from its config:
    Llama layouts counted from the config, any other built on the meta device and counted."""
    config = hf_config
    sizes = llama_tensor_sizes(config, head)
    adapters = None
    if sizes is not None and (
        lora is None or llama_lora_count(config, list(lora.target_modules), lora.r) is not None
    ):
        flat = [n for group in sizes.values() for n in group]
        total = sum(flat)
        persistent = sum(n for n in flat if n < PERSISTENCE_THRESHOLD)
        largest = max(flat)
        if lora is not None:
            adapters = llama_lora_count(config, list(lora.target_modules), lora.r)
    else:
        model = _meta_model(config, head)
        total, persistent, largest = _meta_stats(model)
        if lora is not None:
            adapters = lora_param_count(model, list(lora.target_modules), lora.r)
    num_trainable = total if trainable else 0
    if trainable and adapters is not None:
        total, num_trainable = total + adapters, adapters
    shape = LMShape(
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        vocab=config.vocab_size if head == "lm" else 1,
    )
    part = ModelPart(name, total, num_trainable, True, False, False, persistent, largest)
    return part, shape


def _meta_model(config: Any, head: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == "score":
        fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        config = type(config).from_dict({**fields, "num_labels": 1})
    cls = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        return cls.from_config(config)


def preset_hf_config(preset: str, vocab_size: int) -> Any:
    """The preset's LlamaConfig as fmray.models.registry.preset_config builds it, without
    importing transformers' modeling code (seconds on the driver, before every run)."""
    from transformers import LlamaConfig

    from fmray.models.presets import PRESETS

    return LlamaConfig(**PRESETS[preset], vocab_size=vocab_size, tie_word_embeddings=False)


def preset_in_name(path: str, presets: list[str]) -> str | None:
    """The longest preset name inside a path's last parts (`runs/sft-llama-1b` -> llama-1b)."""
    text = "/".join(Path(path).parts[-2:]).lower().replace("_", "-")
    found = [name for name in presets if name in text]
    return max(found, key=len) if found else None


def resolve_lm_config(
    path: str | None, preset: str | None, vocab: int | None, key: str, notes: list[str]
) -> Any:
    """The HF config of `path` (an HF folder or fmray run), else of a preset: the given one,
    or the one the path names. Raises ConfigError naming `key` when neither is known."""
    from fmray.models.presets import PRESETS

    if path is not None:
        local = _local_hf_dir(path)
        if local is not None:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(local)
        preset = preset or preset_in_name(path, [*PRESETS, *PUBLIC_SHAPES])
        if preset in PUBLIC_SHAPES:
            from transformers import LlamaConfig

            notes.append(f"{key}={path} is not on this machine: sized as Llama-3 {preset[6:]}")
            return LlamaConfig(**PUBLIC_SHAPES[preset], tie_word_embeddings=False)
        if preset is None:
            raise ConfigError(
                f"config error: {key}={path!r} is not on this machine and names no preset; "
                f"plan it as one with --model-preset (allowed: {', '.join(PRESETS)})"
            )
        notes.append(f"{key}={path} is not on this machine: sized as preset {preset}")
    assert preset is not None
    if vocab is None:
        vocab = 512 if preset in SMALL_PRESETS else DEFAULT_LARGE_VOCAB
        if path is not None:
            notes[-1] += f" with a {vocab}-token vocabulary"
    return preset_hf_config(preset, vocab)


def _local_hf_dir(path: str) -> str | None:
    from fmray import storage
    from fmray.checkpoint import find_hf_export

    if storage.is_remote(path):
        return None
    try:
        return find_hf_export(path)
    except (FileNotFoundError, OSError):
        return None


def tokenizer_vocab(tokenizer_dir: str | None) -> int | None:
    """The vocabulary of a local tokenizer folder (tokenizer.json), if there is one."""
    if tokenizer_dir is None:
        return None
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return len(data["model"]["vocab"]) + len(data.get("added_tokens", []))


# ----------------------------------------------------------------------------- recipes


def workload_of(recipe: str, config: Any, model_preset: str | None = None) -> Workload:
    """The Workload of a validated recipe config (`model_preset` sizes a model.path that is not
    on this machine)."""
    if recipe == "diffusion":
        from fmray.distributed.diffusion_memory import diffusion_workload

        return diffusion_workload(config, model_preset)
    builders = {
        "pretrain": _pretrain,
        "sft": _sft,
        "reward": _reward,
        "dpo": _dpo,
        "ppo": _rl,
        "grpo": _rl,
    }
    if recipe not in builders:
        allowed = ", ".join([*builders, "diffusion"])
        raise ConfigError(f"fmray plan: {recipe!r} is not a training recipe (allowed: {allowed})")
    return builders[recipe](recipe, config, model_preset)


def _policy_config(config: Any, model_preset: str | None, notes: list[str]) -> Any:
    data = config.data
    vocab = tokenizer_vocab(getattr(data, "tokenizer", None))
    if vocab is None and config.model.path is None:
        vocab = getattr(data, "vocab_size", None)
    preset = model_preset or (config.model.preset if config.model.path is None else None)
    return resolve_lm_config(config.model.path, preset, vocab, "model.path", notes)


def lm_workload(
    recipe: str,
    parts: list[ModelPart],
    shape: LMShape,
    sequences_per_micro: int,
    seq_len: int,
    what: str,
    notes: list[str],
) -> Workload:
    def activations(micro: int, checkpointing: bool, bf16: bool) -> int:
        return lm_activation_bytes(shape, sequences_per_micro * micro, seq_len, checkpointing, bf16)

    note = f"{what} x {seq_len} tokens per micro-batch element"
    return Workload(recipe, parts, activations, note, notes)


def _pretrain(recipe: str, config: Any, model_preset: str | None) -> Workload:
    notes: list[str] = []
    part, shape = lm_part("model", _policy_config(config, model_preset, notes), "lm", True)
    return lm_workload(recipe, [part], shape, 1, config.data.seq_len, "1 block", notes)


def _sft(recipe: str, config: Any, model_preset: str | None) -> Workload:
    notes: list[str] = []
    hf = _policy_config(config, model_preset, notes)
    part, shape = lm_part("model", hf, "lm", True, config.lora)
    return lm_workload(recipe, [part], shape, 1, config.data.seq_len, "1 sequence", notes)


def _reward(recipe: str, config: Any, model_preset: str | None) -> Workload:
    notes: list[str] = []
    hf = _policy_config(config, model_preset, notes)
    part, shape = lm_part("reward model", hf, "score", True, config.lora)
    return lm_workload(recipe, [part], shape, 2, config.data.seq_len, "2 sequences (pair)", notes)


def _dpo(recipe: str, config: Any, model_preset: str | None) -> Workload:
    notes: list[str] = []
    hf = _policy_config(config, model_preset, notes)
    policy, shape = lm_part("policy", hf, "lm", True, config.lora)
    parts = [policy]
    if config.lora is None and not config.dpo.precompute_reference:
        reference_path = config.dpo.reference or config.model.path
        ref_hf = resolve_lm_config(reference_path, model_preset, None, "dpo.reference", notes)
        parts.append(lm_part("reference", ref_hf, "lm", False)[0])
    return lm_workload(recipe, parts, shape, 2, config.data.seq_len, "2 sequences (pair)", notes)


def _rl(recipe: str, config: Any, model_preset: str | None) -> Workload:
    notes: list[str] = []
    hf = _policy_config(config, model_preset, notes)
    policy, shape = lm_part("policy", hf, "lm", True, config.lora)
    parts, shapes = [policy], [shape]
    if config.lora is None:
        reference = config.reference or config.model.path
        ref_hf = resolve_lm_config(reference, model_preset, None, "reference", notes)
        parts.append(lm_part("reference", ref_hf, "lm", False)[0])
    if config.reward.model is not None:
        rm_hf = resolve_lm_config(config.reward.model, model_preset, None, "reward.model", notes)
        parts.append(lm_part("reward model", rm_hf, "score", False)[0])
    if recipe == "ppo":
        critic_path = config.ppo.critic or config.reward.model or config.model.path
        critic_hf = resolve_lm_config(critic_path, model_preset, None, "ppo.critic", notes)
        critic, critic_shape = lm_part("critic", critic_hf, "score", True)
        parts.append(critic)
        shapes.append(critic_shape)
    seq_len = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    rollout_batch = config.rollout.max_batch_size

    def activations(micro: int, checkpointing: bool, bf16: bool) -> int:
        # Rollout (KV cache) and the updates (policy, then critic) do not overlap in time.
        updates = [lm_activation_bytes(s, micro, seq_len, checkpointing, bf16) for s in shapes]
        return max([kv_cache_bytes(shape, rollout_batch, seq_len, bf16), *updates])

    note = (
        f"max of the update (micro-batch x {seq_len} tokens, prompt + reply) and the rollout "
        f"KV cache ({rollout_batch} sequences)"
    )
    return Workload(recipe, parts, activations, note, notes)
