"""Docs that run: docs/config.md matches the schemas, and the README / docs/ commands in code
blocks marked ```bash runnable exit 0 (run from the repository root)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fmray.cli import main
from fmray.docs_config import DOC, markdown_lines, render
from tests.conftest import REPO_ROOT

RUNNABLE = re.compile(r"^```bash runnable\n(.*?)^```", re.MULTILINE | re.DOTALL)


def runnable_blocks() -> list[tuple[str, str]]:
    """(file:line, command) of every command line in a ```bash runnable block."""
    found = []
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for block in RUNNABLE.finditer(text):
            first_line = text[: block.start()].count("\n") + 2
            for offset, line in enumerate(block.group(1).splitlines()):
                command = line.split("  #")[0].strip()
                if command and not command.startswith("#"):
                    where = f"{path.relative_to(REPO_ROOT)}:{first_line + offset}"
                    found.append((where, command))
    return found


BLOCKS = runnable_blocks()


def test_config_reference_is_in_sync_with_the_schemas() -> None:
    assert DOC.read_text() == render(), "docs/config.md is stale: run python -m fmray.docs_config"


def test_help_and_the_reference_come_from_the_same_lines(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    help_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    keys = [line for line in help_lines if re.match(r"^  [a-z_]+\.\S+ \(", line)]
    assert len(keys) > 40
    section = DOC.read_text().split("\n## dpo\n", 1)[1].split("\n## ", 1)[0]
    for item in markdown_lines(keys):
        assert item in section


def test_the_readme_opens_with_runnable_commands() -> None:
    readme = [where for where, _ in BLOCKS if where.startswith("README.md")]
    assert len(readme) >= 3
    assert any("doctor" in command for _, command in BLOCKS)


@pytest.mark.parametrize(("where", "command"), BLOCKS, ids=[w for w, _ in BLOCKS])
def test_runnable_command(where: str, command: str) -> None:
    venv_bin = str(Path(sys.executable).parent)
    command = re.sub(r"(^|\s)\.venv/bin/", rf"\g<1>{venv_bin}/", command)
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, f"{where}: {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
