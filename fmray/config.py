"""Typed configs shared by every recipe: YAML file + dotted overrides, strict validation.

    fmray pretrain --config jobs/pretrain/tiny.yaml train.max_steps=50 zero.stage=3

Every section forbids unknown keys. An invalid config raises `ConfigError` with one line that
names the dotted key, the bad value and what is allowed, before any Ray resource is requested.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """One-line, user-facing config error."""


class Section(BaseModel):
    """Base of all config sections: strict, documented by attribute docstrings.

    A section field may default to a customised instance (`run: RunSection =
    RunSection(name="pretrain")`); a partial override keeps that instance's values.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _keep_customised_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            if isinstance(field.default, BaseModel) and isinstance(data.get(name), dict):
                merged[name] = deep_merge(field.default.model_dump(exclude_unset=True), data[name])
        return merged


class RunSection(Section):
    name: str = "run"
    """Run name: outputs go to <output_dir>/<name>/. Reusing a name resumes that run."""
    output_dir: str = "runs"
    """Folder (or cloud URI, through Ray Train's storage_path) that holds every run."""
    seed: int = 0
    """Seed for model init, data order and sampling."""


class ModelSection(Section):
    preset: str | None = "tiny"
    """Preset name from fmray.models.PRESETS (tiny, small, llama-125m, llama-1b, llama-7b)."""
    path: str | None = None
    """Local HF causal-LM directory to start from (overrides preset)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        from fmray.models.presets import PRESETS

        if self.path is None and self.preset is None:
            raise ValueError("model.preset or model.path must be set")
        if self.path is None and self.preset not in PRESETS:
            raise ValueError(
                f"model.preset={self.preset!r} is unknown (allowed: {', '.join(PRESETS)})"
            )
        return self


class DataSection(Section):
    source: str = "synthetic"
    """'synthetic' (built-in corpus) or a .txt/.jsonl/.parquet file or folder of them."""
    text_field: str = "text"
    """Field holding the text in .jsonl / .parquet sources."""
    num_documents: int = Field(2000, ge=1)
    """Documents generated for the synthetic corpus."""
    seq_len: int = Field(128, ge=8)
    """Tokens per packed training block."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Fraction of documents held out for validation loss."""
    tokenizer: str | None = None
    """HF tokenizer directory; unset: train a byte-level BPE on the corpus into the run dir."""
    vocab_size: int = Field(512, ge=260)
    """Vocabulary size when fmray trains the tokenizer."""
    cache_dir: str | None = None
    """Keep packed parquet blocks here so later runs skip tokenization (default: run dir)."""


class TrainSection(Section):
    max_steps: int = Field(100, ge=1)
    """Optimizer steps to run."""
    micro_batch_size: int = Field(8, ge=1)
    """Blocks per worker per forward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps."""
    lr_decay_steps: int | None = Field(None, ge=1)
    """Cosine decay horizon (default: max_steps); set it to extend a run later without a jump."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global grad norm to this value (0 disables)."""
    bf16: bool = False
    """Train in bf16 mixed precision (GPU; fp32 on CPU is exact)."""
    log_every: int = Field(1, ge=1)
    """Log metrics every N steps."""
    eval_every: int = Field(0, ge=0)
    """Validation loss every N steps (0: only at the end)."""
    eval_batches: int = Field(4, ge=1)
    """Micro-batches per worker per validation pass."""


class ZeroSection(Section):
    stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage: 0 (DDP), 1 (optimizer), 2 (+grads), 3 (+params)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (needs stage >= 1)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (needs stage 3)."""

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> ZeroSection:
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("zero.offload_optimizer=true needs zero.stage in 1, 2, 3 (got 0)")
        if self.offload_params and self.stage != 3:
            raise ValueError(f"zero.offload_params=true needs zero.stage=3 (got {self.stage})")
        return self


class CheckpointSection(Section):
    every_steps: int = Field(0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept; older ones are deleted."""
    resume: str = "auto"
    """'auto' (newest complete checkpoint of this run), 'never', or a checkpoint directory."""
    export_hf: bool = True
    """Write an HF export (safetensors, config, tokenizer) into each checkpoint."""


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (one DeepSpeed rank each)."""
    use_gpu: bool = False
    """One GPU per worker, nccl; otherwise CPU and gloo."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs reserved per worker."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts from the newest checkpoint (-1: unlimited)."""
    memory_check: bool = True
    """Before Ray starts, plan per-worker memory (`fmray plan`) and stop a run that will not fit."""
    device_memory: str | None = None
    """One worker's device memory for that check, e.g. 80GiB; unset: this machine's GPU, or on
    CPU the available host memory / num_workers (a GPU run submitted from a CPU host skips it)."""

    @model_validator(mode="after")
    def _device_memory_is_a_size(self) -> ScalingSection:
        if self.device_memory is not None:
            from fmray.distributed.planner import parse_size

            try:
                parse_size(self.device_memory)
            except ConfigError:
                raise ValueError(
                    f"scaling.device_memory={self.device_memory!r} is not a size "
                    "(e.g. 80GiB, 141GB, 24G)"
                ) from None
        return self


class LoggingSection(Section):
    tensorboard: bool = True
    """Write TensorBoard event files to <run dir>/tensorboard."""
    progress: bool = True
    """Print a progress line on rank 0."""
    verbose: bool = False
    """Show Ray's own log lines on the console too (they are always in Ray's log folder)."""
    mlflow: bool = False
    """Also log metrics and the config to MLflow (needs `pip install 'fmray[mlflow]'`)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; unset: a local file store, <run.output_dir>/mlruns."""
    mlflow_experiment: str = "fmray"
    """MLflow experiment that holds the run (created if missing)."""

    @model_validator(mode="after")
    def _mlflow_installed(self) -> LoggingSection:
        import importlib.util

        if self.mlflow and importlib.util.find_spec("mlflow") is None:
            raise ValueError(
                "logging.mlflow=true needs MLflow: pip install 'fmray[mlflow]' (mlflow-skinny)"
            )
        return self


C = TypeVar("C", bound=BaseModel)
# Raw config values named by where they came from: a YAML file's path, "the command line".
ConfigLayer = tuple[str, dict[str, Any]]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['train.lr=3e-4', 'zero.stage=3'] into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        value = _load_yaml(raw, f"override {item!r}", in_file=False) if raw != "" else ""
        set_dotted(nested, key.strip(), value)
    return nested


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        bad = err.object[err.start]
        raise ConfigError(
            f"config error: {path}:{line}: not UTF-8 text (byte 0x{bad:02x})"
        ) from None
    data = _load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _load_yaml(text: str, origin: str, in_file: bool = True) -> Any:
    """YAML text -> value; a syntax error becomes one line naming the file, line and column
    (`origin:line:column`, as compilers print it), or the override and its column."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:

        def at(mark: yaml.Mark) -> str:
            column = f"column {mark.column + 1}"
            return f"line {mark.line + 1}, {column}" if in_file else column

        mark = err.problem_mark or err.context_mark
        where = origin
        if mark is not None:
            where += f":{mark.line + 1}:{mark.column + 1}" if in_file else f" {at(mark)}"
        what = err.problem or err.context or "invalid YAML"
        opened = err.context_mark
        if err.problem and err.context and opened is not None and opened is not mark:
            what += f" ({err.context} at {at(opened)})"
        raise ConfigError(f"config error: {where}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        message = " ".join(str(err).split())
        raise ConfigError(f"config error: {origin}: invalid YAML: {message}") from None
    except RecursionError:
        raise ConfigError(f"config error: {origin}: invalid YAML: nested too deeply") from None


def read_layers(path: str | Path | None, overrides: list[str] | None = None) -> list[ConfigLayer]:
    """The raw values of a YAML file (optional) and of dotted overrides, each named by origin."""
    layers = [(str(path), read_yaml(path))] if path else []
    if overrides:
        layers.append(("the command line", parse_overrides(overrides)))
    return layers


def merge_layers(layers: Sequence[ConfigLayer]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for _, tree in layers:
        data = deep_merge(data, tree)
    return data


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """YAML file (optional) + dotted overrides -> validated config, or one-line ConfigError."""
    return validate_config(cls, merge_layers(read_layers(path, overrides)))


def validate_config(cls: type[C], data: dict[str, Any]) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(cls, err)) from None


def format_validation_error(cls: type[BaseModel], err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(allowed_keys(cls, first["loc"][:-1]))
        return f"config error: unknown key {key}={value!r} (allowed here: {allowed})"
    if first["type"] == "value_error" and not first["loc"] or isinstance(value, dict):
        return f"config error: {msg}"
    return f"config error: {key}={value!r}: {msg}"


def allowed_keys(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(str(part))
        model = section_type(field.annotation) if field else None
        if model is None:
            return []
    return list(model.model_fields)


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section class inside an annotation like `LoraSection | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = section_type(arg)
            if found is not None:
                return found
    return None


def describe_config(cls: type[BaseModel], layers: Sequence[ConfigLayer] = ()) -> list[str]:
    """One line per key for --help: dotted name, type, the value a run would use, meaning.

    Defaults are the field defaults' own values (a recipe's `TrainSection(lr=1e-4)`), not the
    section classes'. Values from `layers` (the --config file, then the command line) are shown
    with where they came from. Nothing is validated, so help works on incomplete configs.
    """
    return _describe_section(cls, None, merge_layers(layers), list(layers), ())


_REQUIRED = object()
_UNSET = object()


def _describe_section(
    cls: type[BaseModel],
    defaults: BaseModel | None,
    given: dict[str, Any],
    layers: list[ConfigLayer],
    path: tuple[str, ...],
) -> list[str]:
    lines: list[str] = []
    for name, field in cls.model_fields.items():
        if defaults is not None:
            default = getattr(defaults, name)
        elif field.is_required():
            default = _REQUIRED
        else:
            default = field.get_default(call_default_factory=True)
        value = given.get(name, _UNSET)
        lines.extend(_describe_field(field, default, value, layers, (*path, name)))
    return lines


def _describe_field(
    field: FieldInfo, default: Any, value: Any, layers: list[ConfigLayer], path: tuple[str, ...]
) -> list[str]:
    key, about = ".".join(path), " ".join((field.description or "").split())
    sub = section_type(field.annotation)
    if sub is not None:
        lines = []
        if not isinstance(default, BaseModel):
            # An optional section (`lora: LoraSection | None = None`): setting a key enables it.
            shown = _value_text(default, value, layers, path, section=True)
            lines.append(f"  {key} (optional section, {shown}): {about}")
        return lines + _describe_section(
            sub,
            default if isinstance(default, BaseModel) else None,
            value if isinstance(value, dict) else {},
            layers,
            path,
        )
    entry = mapping_section(field.annotation)
    if entry is not None:
        # A mapping of named sections (serve's models): given entries replace the default ones.
        lines = [f"  {key} (mapping of name -> entry): {about}"]
        entries = value if isinstance(value, dict) and value else {}
        defaults = {} if entries or not isinstance(default, dict) else default
        for name in list(entries or defaults) or ["<name>"]:
            entry_default = defaults.get(name)
            entry_value = entries.get(name)
            lines += _describe_section(
                entry,
                entry_default if isinstance(entry_default, BaseModel) else None,
                entry_value if isinstance(entry_value, dict) else {},
                layers,
                (*path, name),
            )
        return lines
    type_name = str(field.annotation).replace("typing.", "")
    if typing.get_origin(field.annotation) is None:
        type_name = getattr(field.annotation, "__name__", type_name)
    if value is not _UNSET:
        value = _as_field_type(field, value)
    shown = _value_text(default, value, layers, path)
    if is_secret(field) and (value not in (_UNSET, None) or default not in (None, _REQUIRED)):
        shown = "set, not shown"  # help output lands in terminals, CI logs and issue reports
    return [f"  {key} ({type_name}, {shown}): {about}"]


def is_secret(field: FieldInfo) -> bool:
    """A field declared with `json_schema_extra={"secret": True}` (an API key, a token)."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("secret") is True


def _as_field_type(field: FieldInfo, value: Any) -> Any:
    """A given value as the run would see it ('3e-4' -> 0.0003), or as given if it is invalid."""
    try:
        return TypeAdapter(field.annotation).validate_python(value)
    except (ValidationError, TypeError, ValueError):
        return value


def mapping_section(annotation: Any) -> type[BaseModel] | None:
    """The entry Section of an annotation like `dict[str, ModelEntry]`, if any."""
    if typing.get_origin(annotation) is not dict:
        return None
    return section_type(typing.get_args(annotation)[-1])


def _value_text(
    default: Any,
    value: Any,
    layers: list[ConfigLayer],
    path: tuple[str, ...],
    section: bool = False,
) -> str:
    default_text = "required" if default is _REQUIRED else f"default {default!r}"
    if value is _UNSET:
        return default_text
    shown = "set" if section and isinstance(value, dict) else repr(value)
    return f"{shown} from {value_source(layers, path)}; {default_text}"


def value_source(layers: Sequence[ConfigLayer], path: tuple[str, ...]) -> str:
    """Name of the last layer that sets the dotted `path` (later layers win)."""
    source = ""
    for name, tree in layers:
        node: Any = tree
        for part in path:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            source = name
    return source


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
