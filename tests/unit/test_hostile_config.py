"""Broken config files through the real command line: one line naming file, line and column.

python -m pytest -q tests/unit/test_hostile_config.py
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest


def fmray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fmray", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "train: {max_steps: [1, 2\n",
            ":2:1: invalid YAML: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence at line 1, column 20)",
        ),
        ("train:\n  lr: 1\n bad\n", ":3:2: invalid YAML: expected <block end>"),
        ("train:\n\tlr: 1\n", ":2:1: invalid YAML: found character '\\t'"),
        ("a: &x [1]\nb: *y\n", ":2:4: invalid YAML: found undefined alias 'y'"),
        ("train: " + "[" * 5_000 + "\n", ": invalid YAML: nested too deeply"),
    ],
)
def test_yaml_syntax_errors_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    proc = fmray("pretrain", "--config", str(path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"config error: {path}{expected}")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_serve_and_tune_read_files_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("models: {tiny: {path: [1, 2\n")
    for command in ("serve", "tune"):
        proc = fmray(command, "--config", str(path))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(
            f"config error: {path}:2:1: invalid YAML: expected ',' or ']'"
        )


def test_non_utf8_file_and_broken_override(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"run:\n  name: caf\xe9\n")
    proc = fmray("pretrain", "--config", str(path))
    expected = f"config error: {path}:2: not UTF-8 text (byte 0xe9)\n"
    assert (proc.returncode, proc.stderr) == (2, expected)
    proc = fmray("pretrain", "train.max_steps=[1")
    assert proc.returncode == 2
    assert proc.stderr == (
        "config error: override 'train.max_steps=[1' column 3: invalid YAML: expected ',' or ']',"
        " but got '<stream end>' (while parsing a flow sequence at column 1)\n"
    )


def test_help_never_prints_the_api_key(tmp_path: Path) -> None:
    from fmray.cli import main

    path = tmp_path / "serve.yaml"
    path.write_text("serve:\n  api_key: sk-from-the-file-1f3a\n")
    for args in (["--config", str(path)], ["serve.api_key=sk-from-the-line-77c2"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(["serve", *args, "--help"])
        line = next(line for line in out.getvalue().splitlines() if "serve.api_key" in line)
        assert "set, not shown" in line and "sk-from" not in out.getvalue()
