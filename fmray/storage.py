"""Run storage: a local folder or a remote URI (s3://, gs://, ...), reached through pyarrow.

    fmray pretrain --config jobs/pretrain/tiny.yaml run.output_dir=s3://my-bucket/runs

Everything a worker needs (tokenizer, packed data, base model, checkpoints, the run's config and
metrics) lives under the run's storage, as Ray Train keeps its checkpoints, so no node assumes a
filesystem shared with the driver. Remote access goes through `pyarrow.fs.FileSystem.from_uri`,
which reads the usual credentials and endpoint from the environment (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...); fmray forwards those to its workers.

A location is a plain string: an absolute local path, or a URI. Writers of files that readers
poll (`write_text`) make them appear whole: a local file is renamed into place, a remote object
is created by a single PUT.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(location: str | Path) -> bool:
    """True for URIs other than file://."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def resolve(location: str | Path) -> str:
    """A local path made absolute (~ expanded); URIs pass through unchanged."""
    text = str(location)
    if is_remote(text):
        return text.rstrip("/")
    return str(Path(text.removeprefix("file://")).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """`location`/part/...: URI-aware (Path would turn s3://bucket into s3:/bucket)."""
    if is_remote(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def name_of(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and the path inside it."""
    if is_remote(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), resolve(location)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def list_names(location: str) -> list[str]:
    """Names of the entries directly inside a folder (empty if it does not exist), sorted."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def read_text(location: str) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(location: str, text: str) -> None:
    """Write a whole file; readers never see it half-written."""
    if not is_remote(location):
        path = Path(resolve(location))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def upload_dir(local_dir: str | Path, location: str) -> None:
    """Copy a local folder's contents to `location` (any storage)."""
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, destination_filesystem=fs)


def download_dir(location: str, local_dir: str | Path) -> Path:
    """Copy a folder from `location` into `local_dir` (created) and return it."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location}: no such folder")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs)
    return Path(local_dir)


def delete_dir(location: str) -> None:
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def local_copy(location: str, scratch: str | Path | None = None) -> Path:
    """A local folder holding `location`'s files: the folder itself when local, else a download
    into a fresh folder under `scratch` (default: a new temporary folder of this process)."""
    if not is_remote(location):
        return Path(resolve(location))
    root = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="fmray-storage-"))
    return download_dir(location, root / name_of(location))


def publish_dir(local_dir: Path, location: str) -> None:
    """Make a finished local folder appear at `location`: a rename when local, else an upload."""
    if is_remote(location):
        upload_dir(local_dir, location)
        shutil.rmtree(local_dir, ignore_errors=True)
        return
    target = Path(resolve(location))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        local_dir.rename(target)
    except OSError:  # another process published the same folder first: theirs is identical
        shutil.rmtree(local_dir, ignore_errors=True)


def staging_dir(location: str, prefix: str = "fmray-stage-") -> Path:
    """Where to build a folder that `publish_dir` then moves to `location`.

    Local: a sibling of the target (so publishing is one rename on the same filesystem);
    remote: a temporary local folder, removed once uploaded.
    """
    if is_remote(location):
        return Path(tempfile.mkdtemp(prefix=prefix))
    target = Path(resolve(location))
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def mtime(location: str) -> float:
    """Modification time in seconds (0 when unknown)."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.mtime is not None else 0.0
