"""Run storage: the same calls on a local folder and on an S3-compatible server (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fmray import storage
from tests.conftest import S3_BUCKET


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_server")
    return f"s3://{S3_BUCKET}/unit-{tmp_path.name}"


def test_join_keeps_uris_intact() -> None:
    assert (
        storage.join("s3://bucket/runs", "name", "tokenizer") == "s3://bucket/runs/name/tokenizer"
    )
    assert storage.join("/data/runs", "name") == "/data/runs/name"
    assert storage.resolve("s3://bucket/runs/") == "s3://bucket/runs"
    assert storage.resolve("relative").startswith("/")
    assert storage.name_of("s3://bucket/runs/name") == "name"


def test_files_and_folders_round_trip(root: str, tmp_path: Path) -> None:
    text_file = storage.join(root, "run", "config.yaml")
    assert not storage.exists(text_file)
    storage.write_text(text_file, "a: 1\n")
    assert storage.is_file(text_file) and storage.read_text(text_file) == "a: 1\n"
    assert storage.list_names(storage.join(root, "run")) == ["config.yaml"]
    assert storage.list_names(storage.join(root, "missing")) == []

    local = tmp_path / "folder"
    (local / "sub").mkdir(parents=True)
    (local / "x.txt").write_text("x")
    (local / "sub" / "y.txt").write_text("y")
    storage.upload_dir(local, storage.join(root, "copied"))
    back = storage.download_dir(storage.join(root, "copied"), tmp_path / "back")
    assert (back / "x.txt").read_text() == "x" and (back / "sub" / "y.txt").read_text() == "y"
    copy = storage.local_copy(storage.join(root, "copied"), tmp_path / "scratch")
    assert (copy / "sub" / "y.txt").read_text() == "y"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.download_dir(storage.join(root, "nothing"), tmp_path / "none")


def test_published_folder_appears_whole(root: str) -> None:
    target = storage.join(root, "data", "key")
    staging = storage.staging_dir(target)
    (staging / "train").mkdir()
    (staging / "train" / "shard.parquet").write_bytes(b"rows")
    (staging / "done.json").write_text("{}")
    storage.publish_dir(staging, target)
    assert storage.list_names(target) == ["done.json", "train"]
    assert not staging.exists()
    # Nothing else was left beside it (a local staging folder is a sibling, renamed away).
    assert storage.list_names(storage.join(root, "data")) == ["key"]
