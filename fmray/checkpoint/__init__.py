"""Checkpoints: the shared format (format.py), one exporter per kind (exporters.py), finding
checkpoints and exports inside run folders."""

from fmray.checkpoint.exporters import (
    checkpoint_records,
    export_checkpoint,
    exporter_for,
    find_hf_export,
    latest_checkpoint,
    list_checkpoints,
)
from fmray.checkpoint.format import (
    CONFIG_FILE,
    META_FILE,
    kind_of,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "checkpoint_records",
    "export_checkpoint",
    "exporter_for",
    "find_hf_export",
    "kind_of",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_meta",
    "save_checkpoint",
]
