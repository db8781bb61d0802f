"""One exporter per checkpoint kind, and finding checkpoints and exports inside run folders.

    fmray export runs/pretrain-tiny/checkpoint_00000120 exported/          # kind causal_lm
    fmray export runs/sft-tiny-lora/checkpoint_00000200 adapter/ --adapter-only   # kind lora

A checkpoint's `kind` (fmray.json) names its exporter. An exporter writes the export into each
checkpoint during training (`write_live`, a collective call on every rank) and rebuilds it later
from the DeepSpeed files alone (`export`). A new model kind adds a module with its exporter and
one line in EXPORTERS; nothing else changes.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from fmray import storage
from fmray.checkpoint.format import META_FILE, kind_of, read_meta

# kind -> "module:class" of its exporter (imported on use: each pulls in its own libraries).
EXPORTERS: dict[str, str] = {
    "causal_lm": "fmray.checkpoint.causal_lm:CausalLMExporter",
    "lora": "fmray.checkpoint.lora:LoraExporter",
    "diffusion": "fmray.checkpoint.diffusion:DiffusionExporter",
    "reward": "fmray.checkpoint.reward:RewardExporter",
    "reward_lora": "fmray.checkpoint.reward:RewardLoraExporter",
}
CHECKPOINT_PREFIX = "checkpoint_"


class Exporter(Protocol):
    kind: str

    def write_live(
        self, engine: Any, ckpt_dir: Path, tokenizer: Any, meta: dict[str, Any], weights: bool
    ) -> None:
        """Write the export of the running `engine` into `ckpt_dir` (collective call);
        `weights=False` writes everything but the weights (checkpoint.export_hf=false)."""

    def export(self, ckpt_dir: Path, out_dir: Path, adapter_only: bool) -> Path:
        """Rebuild the export from a checkpoint's files into `out_dir`."""


def exporter_for(kind: str) -> Exporter:
    if kind not in EXPORTERS:
        raise ValueError(
            f"checkpoint kind {kind!r} has no exporter (known: {', '.join(EXPORTERS)})"
        )
    module_name, class_name = EXPORTERS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


def export_checkpoint(location: str, out_dir: str | Path, adapter_only: bool = False) -> Path:
    """The export of any fmray checkpoint (local or remote), picked by its kind."""
    meta = read_meta(location)
    scratch = None if not storage.is_remote(location) else tempfile.mkdtemp(prefix="fmray-export-")
    try:
        ckpt_dir = storage.local_copy(location, scratch)
        return exporter_for(kind_of(meta)).export(ckpt_dir, Path(out_dir), adapter_only)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def publish_export(tmp_dir: Path, out_dir: Path) -> Path:
    """Replace `out_dir` by the finished `tmp_dir`: the export appears whole or not at all."""
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


def partial_dir(out_dir: Path) -> Path:
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return tmp_dir


def copy_tokenizer_files(src: Path, dst: Path, extra: tuple[str, ...] = ()) -> None:
    """Tokenizer, chat template (and `extra` names) from an export to another folder."""
    for path in src.iterdir():
        if "token" in path.name or path.name in ("chat_template.jinja", *extra):
            shutil.copy2(path, dst / path.name)


# ----------------------------------------------------------------------------- finding


def checkpoint_records(run_dir: str) -> list[tuple[int, float, str]]:
    """(step, mtime of fmray.json, location) of a run folder's complete checkpoints, sorted:
    oldest to newest step, ties (a Tune PBT trial re-running a segment from a clone) by time."""
    found = []
    for name in storage.list_names(run_dir):
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        location = storage.join(run_dir, name)
        meta_path = storage.join(location, META_FILE)
        if storage.is_file(meta_path):
            found.append((read_meta(location)["step"], storage.mtime(meta_path), location))
    return sorted(found)


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints (fmray.json present) of a run folder, oldest to newest."""
    return [location for _, _, location in checkpoint_records(run_dir)]


def latest_checkpoint(run_dirs: list[str]) -> str | None:
    """The newest complete checkpoint over several run folders (a Tune trial's segments)."""
    found = [record for run_dir in run_dirs for record in checkpoint_records(run_dir)]
    return max(found)[2] if found else None


def has_weights(model_dir: str) -> bool:
    names = storage.list_names(model_dir)
    return "config.json" in names and any(
        n.startswith("model") and n.endswith(".safetensors") for n in names
    )


def find_hf_export(path: str) -> str:
    """An HF model folder for `path`: the folder itself (config.json), its hf/ export (a
    checkpoint), or the newest checkpoint's hf/ export with weights inside a run folder."""
    location = storage.resolve(path)
    if storage.is_file(storage.join(location, "config.json")):
        return location
    if has_weights(storage.join(location, "hf")):
        return storage.join(location, "hf")
    for checkpoint in reversed(list_checkpoints(location)):
        if has_weights(storage.join(checkpoint, "hf")):
            return storage.join(checkpoint, "hf")
    raise FileNotFoundError(
        f"{path} is neither an HF model folder (config.json) nor an fmray checkpoint or run "
        "folder with an exported model (checkpoint_*/hf with weights)"
    )
