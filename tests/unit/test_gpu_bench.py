"""bench/gpu.sh, the prepared GPU benchmark, driven on CPU: the smoke mode runs every step and
writes the JSON; a missing package or a missing GPU stops it with one line naming what is missing;
missing packages install from carried wheels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gpu_sh(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env}
    full_env["FMRAY_BENCH_SITE"] = str(tmp_path / "site")
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), *args],
        env=full_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_cpu_smoke_runs_every_step_and_writes_the_json(tmp_path):
    done = gpu_sh(
        tmp_path, "--cpu-smoke", FMRAY_BENCH_ARGS="--steps 1 --concurrency 1,2 --max-new-tokens 4"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench-gpu-smoke.json").read_text())
    assert report["mode"] == "cpu-smoke"
    assert not report["environment"]["ray_imported"]
    assert not report["environment"]["deepspeed_imported"]
    variants = {v["variant"]: v for v in report["pretrain"]}
    assert set(variants) == {"no checkpointing", "checkpointing"}
    for variant in variants.values():
        assert variant["tokens_per_s"] > 0 and variant["num_params"] == 918_656
        assert variant["planner"]["total"] > variant["planner"]["runtime"] > 0
    # Checkpointing keeps less for backward: the planner says so for the same micro-batch.
    assert (
        variants["checkpointing"]["planner"]["activations"]
        < variants["no checkpointing"]["planner"]["activations"]
    )
    assert [level["concurrency"] for level in report["serving"]] == [1, 2]
    for level in report["serving"]:
        assert (
            level["fmray_engine_tokens_per_s"] > 0 and level["hf_generate_batched_tokens_per_s"] > 0
        )
    assert "[gpu.sh] done:" in done.stderr


def test_a_missing_package_without_wheels_fails_naming_it(tmp_path):
    done = gpu_sh(
        tmp_path,
        "--cpu-smoke",
        FMRAY_BENCH_EXTRA_MODULES="fmray_missing_probe",
        FMRAY_BENCH_WHEELS=str(tmp_path / "no-wheels"),
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("[gpu.sh] FAILED: missing Python modules: fmray_missing_probe")
    assert "make gpu-wheels" in last


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel of a module named fmray_bench_probe."""
    folder.mkdir()
    path = folder / "fmray_bench_probe-1.0-py3-none-any.whl"
    info = "fmray_bench_probe-1.0.dist-info"
    files = {
        "fmray_bench_probe.py": "VALUE = 1\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: fmray-bench-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return folder


def test_missing_packages_install_from_wheels_then_no_gpu_fails_loudly(tmp_path):
    done = gpu_sh(
        tmp_path,
        FMRAY_BENCH_EXTRA_MODULES="fmray_bench_probe",
        FMRAY_BENCH_WHEELS=str(probe_wheel(tmp_path / "wheels")),
    )
    assert "installing from" in done.stderr and "fmray_bench_probe" in done.stderr
    assert (tmp_path / "site" / "fmray_bench_probe.py").is_file()
    assert done.returncode == 1
    assert "sees no CUDA device" in done.stderr.strip().splitlines()[-1]
