"""The working_dir of a submitted job: the local files and folders a config names, found by
walking its values (and those of YAML files it names), and a staging folder that holds them at
their relative paths. Outputs are never shipped; absolute paths and URIs are the cluster's."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fmray.config import ConfigError, read_yaml

PROG = "fmray submit"
# Outputs (and URL routes), not inputs: never shipped from this machine.
NOT_INPUT_KEYS = {"output_dir", "output", "cache_dir", "route_prefix"}
# Ray moves a working_dir through the GCS, one gRPC message of at most 512 MiB (zipped).
WORKING_DIR_LIMIT_BYTES = 500 * 1024**2
# Keys whose values are locations even without a "/" (a folder in the current directory).
PATH_KEY_NAMES = {"path", "source", "eval_source", "tokenizer", "base", "reference"}


def local_inputs(tree: dict[str, Any], cwd: Path, notes: list[str]) -> dict[str, str]:
    """Dotted key -> relative path of every existing local file or folder the config names
    (and, for YAML files it names, what those name in turn)."""
    found: dict[str, str] = {}
    seen_yaml: set[Path] = set()

    def visit(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if str(name) not in NOT_INPUT_KEYS:
                    visit(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                visit(value, f"{key}[{index}]")
        elif isinstance(node, str) and looks_like_path(key, node):
            check_path(node, key)

    def check_path(value: str, key: str) -> None:
        path = Path(value)
        if path.is_absolute():
            if len(path.parts) > 1:
                notes.append(f"{key}={value} is absolute: the cluster's nodes must reach it")
            return
        try:
            exists = (cwd / path).exists()
        except OSError:  # not a path at all (too long, odd characters)
            return
        if not exists:
            if "/" in value:
                notes.append(f"{key}={value!r} is not on this machine, so it is not shipped")
            return
        rel = relative_inside(cwd / path, cwd)
        if rel == Path("."):
            return
        if rel is None:
            raise ConfigError(
                f"{PROG}: {key}={value!r} is outside the current folder; name it from inside "
                "it, or by an absolute path or URI the cluster's nodes reach"
            )
        found[key] = str(rel)
        resolved = (cwd / path).resolve()
        if resolved.suffix in (".yaml", ".yml") and resolved not in seen_yaml:
            seen_yaml.add(resolved)
            visit(read_yaml(resolved), f"{key}:")

    visit(tree, "")
    output_dir = (tree.get("run") or {}).get("output_dir")
    if isinstance(output_dir, str) and "://" not in output_dir and not output_dir.startswith("/"):
        notes.append(
            f"run.output_dir={output_dir!r} is relative: on the cluster it is inside the job's "
            "working_dir on the head node; set run.output_dir to shared storage "
            "(/mnt/shared/runs, s3://BUCKET/runs) to keep the run"
        )
    return found


def looks_like_path(key: str, value: str) -> bool:
    """A value worth looking for on disk: it has a folder or a file suffix, or its key names a
    location. Not a URI, not a multi-line text, not a search-space expression."""
    if not value or "\n" in value or "://" in value or value.endswith(")"):
        return False
    leaf = key.rsplit(".", 1)[-1]
    return "/" in value or bool(Path(value).suffix) or leaf in PATH_KEY_NAMES


def relative_inside(path: Path, root: Path) -> Path | None:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return None


def path_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else folder_bytes(path)


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def check_size(files: dict[str, Path], inputs: dict[str, str]) -> None:
    sizes = {rel: path_bytes(path) for rel, path in files.items()}
    if sum(sizes.values()) <= WORKING_DIR_LIMIT_BYTES:
        return
    biggest = max(sizes, key=sizes.__getitem__)
    key = next((k for k, rel in inputs.items() if rel == biggest), "--config")
    raise ConfigError(
        f"{PROG}: {key}={biggest!r} is {human_bytes(sizes[biggest])}; Ray ships a working_dir "
        f"of at most {human_bytes(WORKING_DIR_LIMIT_BYTES)}: put it in shared storage "
        "(/mnt/shared/..., s3://...) and name that instead"
    )


def stage(files: dict[str, Path]) -> Path:
    """A temporary folder holding `files` at their relative paths: the job's working_dir."""
    staging = Path(tempfile.mkdtemp(prefix="fmray-submit-"))
    for rel, source in files.items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
    return staging


def human_bytes(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1024 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} GB"
