"""`fmray submit` / `fmray jobs` without a cluster: what a submission would send (entrypoint,
working_dir contents, runtime_env), the commands in every jobs/ preset's header, one-line
errors for bad input, the token lookup and the exit status of a finished job.
(tests/ray/test_submit.py submits to a real head node.)"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fmray.config import ConfigError
from fmray.ops import client
from fmray.ops.submit import build_parser, plan_submission

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBMIT_PREFIX = "fmray submit --address http://HEAD_IP:8265 "


def plan(argv: list[str], cwd: Path):
    """What `fmray submit --dry-run ARGV` run in `cwd` would send."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        return plan_submission(build_parser().parse_args(["--dry-run", *argv]))


def header_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def presets() -> list[Path]:
    return sorted(p for p in (REPO_ROOT / "jobs").rglob("*.yaml") if not p.stem.endswith("_app"))


@pytest.mark.parametrize("preset", presets(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_preset_header_runs_it_locally_and_submits_it(preset: Path) -> None:
    """The header's local command and its submit command name this file; the submit command
    validates and plans as written (nothing is sent)."""
    rel = str(preset.relative_to(REPO_ROOT))
    lines = header_lines(preset)
    local = [
        ln for ln in lines if re.match(rf"fmray (?!submit)\S+ (.* )?--config {re.escape(rel)}", ln)
    ]
    submit = [ln for ln in lines if ln.startswith(SUBMIT_PREFIX)]
    assert local, f"{rel}: no `fmray <command> --config {rel}` line in its header"
    assert submit, f"{rel}: no `{SUBMIT_PREFIX}<command> --config {rel}` line in its header"
    argv = shlex.split(submit[0].split("   #", 1)[0], comments=True)[2:]
    command = local[0].split()[1]
    assert argv[2:5] == [command, "--config", rel]
    submission = plan(argv, REPO_ROOT)
    try:
        assert submission.entrypoint.startswith(f"fmray {command} --config {rel}")
        assert rel in submission.shipped
        # Cluster presets keep their run where every node (and the user) reaches it.
        for note in submission.notes:
            assert not note.startswith("run.output_dir"), note
    finally:
        if submission.staging is not None:
            shutil.rmtree(submission.staging)


@pytest.mark.parametrize("app", sorted((REPO_ROOT / "jobs").rglob("*_app.yaml")), ids=str)
def test_serve_app_files_name_serve_run_and_serve_deploy(app: Path) -> None:
    rel = str(app.relative_to(REPO_ROOT))
    lines = header_lines(app)
    assert any(ln.startswith(f"serve run {rel}") for ln in lines)
    assert any(ln.startswith(f"serve deploy --address http://HEAD_IP:8265 {rel}") for ln in lines)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's folder: a tune config whose base names local data and a local model folder."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "data" / "chat.jsonl").write_text('{"prompt": "1+1", "response": "2"}\n')
    (tmp_path / "models" / "base" / "config.json").write_text("{}")
    sft = (REPO_ROOT / "jobs" / "sft" / "tiny.yaml").read_text()
    sft = sft.replace("path: runs/pretrain-tiny", "path: models/base")
    sft = sft.replace("source: builtin", "source: data/chat.jsonl")
    (tmp_path / "jobs" / "sft.yaml").write_text(sft)
    tune = (REPO_ROOT / "jobs" / "tune" / "sft_tiny.yaml").read_text()
    (tmp_path / "jobs" / "tune.yaml").write_text(
        tune.replace("jobs/sft/tiny.yaml", "jobs/sft.yaml")
    )
    return tmp_path


def test_working_dir_holds_the_config_and_the_local_inputs_it_names(project: Path) -> None:
    submission = plan(
        ["tune", "--config", "jobs/tune.yaml", "num_samples=2", "run.output_dir=/mnt/shared/runs"],
        project,
    )
    staging = submission.staging
    try:
        assert submission.shipped == [
            "data/chat.jsonl",
            "jobs/sft.yaml",
            "jobs/tune.yaml",
            "models/base",
        ]
        assert (staging / "models" / "base" / "config.json").is_file()
        assert (staging / "data" / "chat.jsonl").read_text() == (
            project / "data" / "chat.jsonl"
        ).read_text()
        assert submission.runtime_env == {"working_dir": str(staging)}
        assert submission.entrypoint == (
            "fmray tune --config jobs/tune.yaml num_samples=2 run.output_dir=/mnt/shared/runs"
        )
        assert submission.submission_id.startswith("tune-sft-tiny-")
        assert submission.notes == []  # outputs are never shipped nor flagged
    finally:
        shutil.rmtree(staging)


def test_runtime_env_pip_requirements_and_env(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "requirements.txt").write_text("# extras\nrich==14.0.0\n\nsentencepiece  # tok\n")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    submission = plan(
        ["--pip", "einops==0.8.1", "--requirements", str(project / "requirements.txt")]
        + ["--env", "HF_TOKEN", "--env", "NCCL_DEBUG=INFO", "--job-id", "mine"]
        + ["sft", "--config", "jobs/sft.yaml", "train.lr=1e-4"],
        project,
    )
    shutil.rmtree(submission.staging)
    env = submission.runtime_env
    assert env["pip"] == ["einops==0.8.1", "rich==14.0.0", "sentencepiece"]
    assert env["env_vars"]["HF_TOKEN"] == "hf_secret"
    assert env["env_vars"]["NCCL_DEBUG"] == "INFO"
    assert submission.submission_id == "mine"
    assert submission.shipped == ["data/chat.jsonl", "jobs/sft.yaml", "models/base"]


def test_notes_for_paths_the_job_cannot_get_from_here(project: Path) -> None:
    submission = plan(
        ["sft", "--config", "jobs/sft.yaml", "data.source=data/missing.jsonl"]
        + ["model.path=/mnt/shared/models/base"],
        project,
    )
    shutil.rmtree(submission.staging)
    notes = "\n".join(submission.notes)
    assert "data.source='data/missing.jsonl' is not on this machine" in notes
    assert "model.path=/mnt/shared/models/base is absolute" in notes
    assert "run.output_dir='runs' is relative" in notes
    assert submission.shipped == ["jobs/sft.yaml"]


def test_working_dir_option_ships_the_folder(project: Path) -> None:
    submission = plan(["--working-dir", ".", "sft", "--config", "jobs/sft.yaml"], project)
    assert submission.staging is None
    assert submission.runtime_env["working_dir"] == str(project)
    assert submission.entrypoint == "fmray sft --config jobs/sft.yaml"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pretrain", "--config", "jobs/sft.yaml"], "config error: "),
        (["sft", "--config", "jobs/sft.yaml", "train.lrr=1"], "train.lrr"),
        (["sft", "--config", "jobs/nope.yaml"], "config file jobs/nope.yaml does not exist"),
        (["frobnicate"], "'frobnicate' is not a command to submit"),
        (["jobs", "list"], "'jobs' is not a command to submit"),
        (["sft", "--config", "jobs/sft.yaml", "--address", "x"], "put --address before"),
        (["sft", "--config", "jobs/sft.yaml", "--verbose"], "--config FILE and key=value"),
        (["sft", "--config", "jobs/sft.yaml", "data.source=../x.jsonl"], "data.source='../x"),
        (["--env", "NOT SET", "sft", "--config", "jobs/sft.yaml"], "--env 'NOT SET'"),
        (["--env", "FMRAY_UNSET_VAR", "sft", "--config", "jobs/sft.yaml"], "FMRAY_UNSET_VAR"),
        (["--requirements", "nope.txt", "sft", "--config", "jobs/sft.yaml"], "--requirements"),
        (["--working-dir", "data", "sft", "--config", "jobs/sft.yaml"], "outside --working-dir"),
    ],
)
def test_bad_input_fails_before_anything_is_sent(
    argv: list[str], message: str, project: Path
) -> None:
    (project.parent / "x.jsonl").touch()
    with pytest.raises(ConfigError) as err:
        plan(argv, project)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_dry_run_and_missing_address(project: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RAY_")}
    run = subprocess.run(
        [sys.executable, "-m", "fmray", "submit", "--dry-run", "sft", "--config", "jobs/sft.yaml"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "[fmray] dry run: would submit sft-tiny-" in run.stdout
    assert "entrypoint   fmray sft --config jobs/sft.yaml" in run.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "fmray", "jobs", "list"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "fmray jobs: no job server address: pass --address http://HEAD_IP:8265 (the head node's "
        "dashboard port) or set RAY_API_SERVER_ADDRESS"
    )


def test_job_server_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert client.job_server_address(None, "x") == "http://10.0.0.5:8265"
    assert client.job_server_address("https://ray.example/", "x") == "https://ray.example"
    with pytest.raises(ConfigError, match="is not a job server URL"):
        client.job_server_address("ray://10.0.0.5:10001", "x")


def test_token_is_found_as_the_ray_cli_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(key, raising=False)
    try:
        loader.reset_cache()
        assert client.auth_token() is None
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("from-home-file")
        loader.reset_cache()
        assert client.auth_token() == "from-home-file"
        monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
        loader.reset_cache()
        assert client.auth_token() == "from-env"
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        assert client.auth_token() is None
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        (tmp_path / ".ray" / "auth_token").unlink()
        loader.reset_cache()
        with pytest.raises(ConfigError, match="RAY_AUTH_MODE=token but no token found"):
            client.auth_token()
    finally:
        monkeypatch.undo()
        loader.reset_cache()


@pytest.mark.parametrize(
    ("status", "driver_exit_code", "expected"),
    [("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", None, 1), ("STOPPED", -15, 143)],
)
def test_exit_status(status: str, driver_exit_code: int | None, expected: int) -> None:
    from ray.job_submission import JobStatus

    info = SimpleNamespace(status=JobStatus(status), driver_exit_code=driver_exit_code)
    assert client.exit_status(info) == expected


class InterruptedJob:
    """A job server whose log stream is interrupted by Ctrl-C; the job stops when told to."""

    def __init__(self) -> None:
        self.stopped = False

    async def tail_job_logs(self, job_id: str):
        yield "[fmray] step 1/100\n"
        raise KeyboardInterrupt

    def stop_job(self, job_id: str) -> bool:
        self.stopped = True
        return True

    def get_job_info(self, job_id: str):
        from ray.job_submission import JobStatus

        status = JobStatus.STOPPED if self.stopped else JobStatus.RUNNING
        return SimpleNamespace(status=status, driver_exit_code=None, message="Job was stopped")


@pytest.mark.parametrize(
    ("on_interrupt", "stopped", "code"),
    [("stop", True, 143), ("detach", False, 0), ("ask", False, 0)],
)
def test_ctrl_c_stops_or_detaches(
    on_interrupt: str, stopped: bool, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ask` without a terminal (as here) detaches: a job is never stopped unasked."""
    from fmray.ops.submit import follow_or_interrupt

    job = InterruptedJob()
    assert follow_or_interrupt(job, "job-1", on_interrupt, "http://HEAD_IP:8265") == code
    assert job.stopped is stopped
    out = capsys.readouterr().out
    assert out.startswith("[fmray] step 1/100\n")
    if stopped:
        assert "[fmray] stopping job-1" in out and "job job-1 STOPPED" in out
    else:
        assert "[fmray] detached; job-1 keeps running on the cluster" in out
        assert "fmray jobs stop job-1 --address http://HEAD_IP:8265" in out
