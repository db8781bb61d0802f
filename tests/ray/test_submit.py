"""`fmray submit` and `fmray jobs` against a real head node (`ray start --head`, token auth on)
that this module starts on free ports and stops at its end.

Everything runs in subprocesses pointed at that cluster, so the session's local Ray instance
(tests/ray/conftest.py) is neither used nor disturbed. One Ray Train fit: the tiny pretrain.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.ray.local_cluster import LocalCluster

pytestmark = pytest.mark.ray

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_OVERRIDES = [
    "data.source=data/corpus.txt",  # a local file: it travels in the job's working_dir
    "data.seq_len=64",
    "data.val_fraction=0.1",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "checkpoint.every_steps=0",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    head = LocalCluster(tmp_path_factory.mktemp("submit_cluster"), head_cpus=4)
    try:
        head.start_head()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: the tiny preset and a small text corpus, named by relative paths."""
    from fmray.data.corpus import generate_corpus

    root = tmp_path_factory.mktemp("project")
    (root / "jobs").mkdir()
    shutil.copy(REPO_ROOT / "jobs" / "pretrain" / "tiny.yaml", root / "jobs" / "tiny.yaml")
    (root / "data").mkdir()
    (root / "data" / "corpus.txt").write_text("\n".join(generate_corpus(400, seed=1)) + "\n")
    return root


def fmray(
    cluster: LocalCluster, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fmray", *args],
        cwd=cwd,
        env=env or cluster.env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_submitted_pretrain_succeeds_and_its_checkpoint_appears(
    cluster: LocalCluster, project: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    submit = fmray(
        cluster,
        project,
        "submit",
        "--address",
        cluster.dashboard_url,
        "--job-id",
        "tiny-ok",
        "--env",
        "FMRAY_TEST_MARK=from-submit",
        "pretrain",
        "--config",
        "jobs/tiny.yaml",
        *JOB_OVERRIDES,
        "train.max_steps=3",
        f"run.output_dir={runs}",
        "run.name=submitted",
    )
    out = submit.stdout
    assert submit.returncode == 0, out + submit.stderr
    # What was shipped, then the job's own console streamed back, then the outcome.
    assert "[fmray] submitted tiny-ok" in out
    assert "data/corpus.txt" in out and "jobs/tiny.yaml" in out
    assert "[fmray] step 3/3" in out and "[fmray] done." in out
    assert "[fmray] job tiny-ok SUCCEEDED" in out and "(exit status 0)" in out

    checkpoint = runs / "submitted" / "checkpoint_00000003"
    assert (checkpoint / "fmray.json").is_file()
    assert (checkpoint / "hf" / "model.safetensors").is_file()
    # The job read the shipped corpus (the run's config names it as given).
    config = yaml.safe_load((runs / "submitted" / "config.yaml").read_text())
    assert config["data"]["source"] == "data/corpus.txt"

    status = fmray(
        cluster, project, "jobs", "status", "tiny-ok", "--address", cluster.dashboard_url
    )
    assert status.returncode == 0 and "SUCCEEDED (exit status 0)" in status.stdout
    listing = fmray(cluster, project, "jobs", "list", "--address", cluster.dashboard_url)
    assert (
        "tiny-ok" in listing.stdout and "fmray pretrain --config jobs/tiny.yaml" in listing.stdout
    )
    logs = fmray(cluster, project, "jobs", "logs", "tiny-ok", "--address", cluster.dashboard_url)
    assert "[fmray] done." in logs.stdout


def test_a_failing_job_exit_status_propagates(cluster: LocalCluster, project: Path) -> None:
    """The job fails on the cluster (the checkpoint to resume exists only in the config), before
    any training: `fmray submit` exits with the entrypoint's own status, 2 for a config error."""
    submit = fmray(
        cluster,
        project,
        "submit",
        "--address",
        cluster.dashboard_url,
        "--job-id",
        "tiny-bad",
        "pretrain",
        "--config",
        "jobs/tiny.yaml",
        *JOB_OVERRIDES,
        "checkpoint.resume=/nonexistent/checkpoint_00000010",
    )
    assert submit.returncode == 2, submit.stdout + submit.stderr
    assert "is not an fmray checkpoint directory" in submit.stdout
    assert "[fmray] job tiny-bad FAILED" in submit.stdout
    status = fmray(
        cluster, project, "jobs", "status", "tiny-bad", "--address", cluster.dashboard_url
    )
    assert "FAILED (exit status 2)" in status.stdout


def test_stop_stops_a_running_job_submitted_by_ray_job_submit(
    cluster: LocalCluster, project: Path, tmp_path: Path
) -> None:
    """The documented `ray job submit -- fmray pretrain ...` entrypoint starts a long run;
    `fmray jobs stop` ends it once fmray's driver runs, and no training worker is left behind."""
    env = cluster.env
    env["RAY_API_SERVER_ADDRESS"] = cluster.dashboard_url
    entrypoint = [
        "fmray",
        "pretrain",
        "--config",
        "jobs/tiny.yaml",
        *JOB_OVERRIDES,
        "train.max_steps=100000",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=stopped",
    ]
    ray_submit = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--no-wait"]
        + ["--address", cluster.dashboard_url, "--working-dir", ".", "--submission-id"]
        + ["tiny-long", "--", *entrypoint],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ray_submit.returncode == 0, ray_submit.stdout + ray_submit.stderr
    deadline = time.time() + 240
    while (
        "[fmray] "
        not in (logs := fmray(cluster, project, "jobs", "logs", "tiny-long", env=env)).stdout
    ):
        assert "SUCCEEDED" not in logs.stdout and time.time() < deadline, logs.stdout
        time.sleep(2)

    stop = fmray(cluster, project, "jobs", "stop", "tiny-long", env=env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "tiny-long STOPPED" in stop.stdout
    status = fmray(cluster, project, "jobs", "status", "tiny-long", env=env)
    assert "STOPPED (exit status 143)" in status.stdout
    deadline = time.time() + 60
    while training_workers(cluster) and time.time() < deadline:
        time.sleep(1)
    assert not training_workers(cluster)


def training_workers(cluster: LocalCluster) -> list[int]:
    import psutil

    pids = []
    for node in cluster.nodes:
        for proc in node.descendants():
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    pids.append(proc.pid)
            except psutil.Error:
                pass
    return pids


def test_token_auth_stays_on(cluster: LocalCluster, project: Path, tmp_path: Path) -> None:
    """Without the token (and with a wrong one) the job server refuses, in one line."""
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    missing = fmray(cluster, project, "jobs", "list", "--address", cluster.dashboard_url, env=env)
    assert missing.returncode == 1
    assert "needs a token and none was found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    wrong = fmray(
        cluster,
        project,
        "jobs",
        "list",
        "--address",
        cluster.dashboard_url,
        env={**env, "RAY_AUTH_TOKEN": "0" * 32},
    )
    assert wrong.returncode == 1 and "refused this token" in wrong.stderr
    assert os.environ.get("RAY_AUTH_TOKEN") != cluster.token  # nothing leaked into this process
