"""`fmray doctor` passes here and names the fault of each broken environment built below."""

from __future__ import annotations

import os
import socket
from collections import namedtuple

import pytest

from fmray.cli import main
from tests.conftest import REPO_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def healthy(tmp_path, monkeypatch) -> list[str]:
    """A working environment's arguments: an existing extensions cache, a free port."""
    cache = tmp_path / "torch_extensions"
    cache.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ["doctor", "--runs", str(tmp_path / "runs"), "--port", str(free_port())]


def doctor(argv: list[str], capsys) -> tuple[int, dict[str, str]]:
    """Exit status and each check's printed line (with its fix line, if any)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    lines: dict[str, str] = {}
    name = ""
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  ") and line.split()[0] in ("ok", "warn", "FAIL"):
            name = line[8:25].strip()
            lines[name] = line.strip()
        elif "fix:" in line and name:
            lines[name] += " | " + line.strip()
    return code, lines


def test_passes_here(healthy, capsys) -> None:
    code, lines = doctor(healthy, capsys)
    assert code == 0
    assert all(line.startswith("ok") for line in lines.values()), lines
    assert set(lines) == {
        "python",
        "packages",
        "torch",
        "deepspeed",
        "extensions cache",
        "ray",
        "disk",
        "ports",
    }
    assert "pinned packages at their pinned versions" in lines["packages"]


def test_a_package_at_the_wrong_version(healthy, capsys, tmp_path, monkeypatch) -> None:
    fake = tmp_path / "site"
    info = fake / "pydantic-1.10.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pydantic\nVersion: 1.10.0\n")
    monkeypatch.syspath_prepend(str(fake))
    code, lines = doctor(healthy, capsys)
    assert code == 1
    assert (
        "FAIL  packages          pydantic 1.10.0 installed, fmray pins ==2.14.3"
        in lines["packages"]
    )
    assert "fix: make install" in lines["packages"]


def test_extensions_cache_missing_warns_and_unusable_fails(healthy, capsys, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-cache"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(missing))
    code, lines = doctor(healthy, capsys)
    assert code == 0  # ops still build, once, on first use
    assert lines["extensions cache"].startswith(
        f"warn  extensions cache  TORCH_EXTENSIONS_DIR={missing} does not exist"
    )
    assert f"fix: mkdir -p {missing}" in lines["extensions cache"]

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(a_file))
    code, lines = doctor(healthy, capsys)
    assert code == 1
    assert f"TORCH_EXTENSIONS_DIR={a_file} is a file" in lines["extensions cache"]


def test_an_occupied_serving_port(healthy, capsys) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code, lines = doctor([*healthy, "--port", str(port)], capsys)
    assert code == 1
    assert lines["ports"].startswith(f"FAIL  ports             port {port} in use")
    assert f"lsof -i :{port}" in lines["ports"]


def test_no_disk_space_for_runs(healthy, capsys, monkeypatch) -> None:
    real = os.statvfs
    Statvfs = namedtuple("Statvfs", "f_frsize f_blocks f_bfree f_bavail")

    def nearly_full(path):
        stats = real(path)
        return Statvfs(stats.f_frsize, stats.f_blocks, 10, 10)  # 10 blocks free

    monkeypatch.setattr(os, "statvfs", nearly_full)
    code, lines = doctor(healthy, capsys)
    assert code == 1
    assert "GiB free for" in lines["disk"] and "below 2 GiB" in lines["disk"]
    assert "fix: free space there or set run.output_dir" in lines["disk"]


def test_an_unreachable_ray_address(healthy, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    address = f"http://127.0.0.1:{free_port()}"
    code, lines = doctor([*healthy, "--address", address], capsys)
    assert code == 1
    assert f"no Ray job server answers at {address}" in lines["ray"]
    assert "fix: start the cluster" in lines["ray"]


def test_a_config_that_does_not_fit_its_devices(healthy, capsys) -> None:
    pytest.importorskip("fmray.distributed.planner")
    from fmray.doctor import check_memory

    config = str(REPO_ROOT / "jobs/pretrain/tiny.yaml")
    fits = check_memory(config, None, [])
    assert (
        fits.status == "ok"
        and fits.detail.startswith("pretrain ")
        and fits.detail.endswith(": fits")
    )

    code, lines = doctor([*healthy, "--config", config, "scaling.device_memory=1MiB"], capsys)
    assert code == 1
    assert "scaling.device_memory=1MiB gives 1.0 MiB" in lines["memory"]
    assert "fix: " in lines["memory"]
