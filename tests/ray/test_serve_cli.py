"""`fmray serve` as a user runs it: prints its URL, answers HTTP, drains and stops on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.ray

PORT = 8766
APP = "fmray-cli-test"


def wait_for_line(lines: list[str], text: str, proc: subprocess.Popen, timeout_s: float) -> str:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        found = [line for line in lines if text in line]
        if found:
            return found[0]
        assert proc.poll() is None, "fmray serve exited early:\n" + "".join(lines[-40:])
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} after {timeout_s}s:\n" + "".join(lines[-40:]))


def test_fmray_serve_prints_its_url_serves_and_stops_on_sigterm(
    ray_cluster: Any, tiny_model_dir: Path
) -> None:
    from ray import serve

    serve.shutdown()  # a fresh Serve instance, listening on this test's port
    command = [
        sys.executable,
        "-m",
        "fmray.cli",
        "serve",
        "--config",
        str(REPO_ROOT / "jobs" / "serve" / "llm_tiny.yaml"),
        f"models.tiny.path={tiny_model_dir}",
        f"serve.port={PORT}",
        f"serve.app_name={APP}",
        "autoscaling.max_replicas=1",
        "--address",
        ray_cluster.get_runtime_context().gcs_address,
    ]
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()
    try:
        url_line = wait_for_line(lines, "OpenAI base URL", proc, timeout_s=240)
        base = re.search(r"(http://\S+/v1)\s", url_line).group(1)
        assert base == f"http://localhost:{PORT}/v1"
        assert any(f"curl http://localhost:{PORT}/v1/chat/completions" in line for line in lines)

        models = httpx.get(f"{base}/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        reply = httpx.post(
            f"{base}/completions",
            json={"model": "tiny", "prompt": "Anton has a", "max_tokens": 5, "temperature": 0},
            timeout=120,
        ).json()
        assert reply["usage"]["completion_tokens"] <= 5
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        reader.join(timeout=10)
        output = "".join(lines)
        assert "[fmray] stopping: draining in-flight requests" in output
        assert "[fmray] stopped" in output
        assert APP not in serve.status().applications
    finally:
        if proc.poll() is None:
            proc.kill()
        serve.shutdown()
