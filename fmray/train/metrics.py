"""Rank 0's record of a run: metrics.jsonl, TensorBoard, MLflow (optional) and the progress line.

    fmray pretrain --config jobs/pretrain/tiny.yaml logging.mlflow=true   # + runs/mlruns
    MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/mlruns  # (full mlflow)

For a run folder in remote storage the files are written locally and uploaded every
UPLOAD_EVERY_S seconds, at every evaluation and at the end. MLflow gets the same records
(`logging.mlflow=true`): one MLflow run per fmray run, continued when the run resumes, in a
local file store beside the run folders unless `logging.mlflow_tracking_uri` names another.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fmray import storage
from fmray.config import LoggingSection

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run_id"
UPLOAD_EVERY_S = 30.0


def step_metrics(
    step: int,
    loss_sum: float,
    num_losses: int,
    engine: Any,
    grad_norm: float | None,
    num_tokens: int,
    step_time: float,
    elapsed: float,
) -> dict[str, Any]:
    """The per-step record every recipe logs: mean loss, LR, grad norm, throughput."""
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    return {
        "step": step,
        "loss": loss_sum / num_losses,
        "lr": engine.get_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens_per_s": num_tokens / step_time,
        "step_time_s": step_time,
        "elapsed_s": elapsed,
    }


class MetricsLogger:
    """Rank 0: metrics.jsonl, TensorBoard and a progress line."""

    def __init__(self, run_dir: str, start_step: int, logging: LoggingSection) -> None:
        self.run_dir = run_dir
        self.remote = storage.is_remote(run_dir)
        self.local_dir = Path(tempfile.mkdtemp(prefix="fmray-metrics-")) if self.remote else None
        root = self.local_dir or Path(run_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / METRICS_FILE
        remote_file = storage.join(run_dir, METRICS_FILE)
        if self.remote and storage.is_file(remote_file):
            self.path.write_text(storage.read_text(remote_file))
        # A resumed run replays the steps after its checkpoint: drop their old records.
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        self.progress = logging.progress
        self.writer = None
        if logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(root / TENSORBOARD_DIR), purge_step=start_step + 1)
        self.mlflow = MlflowRun(run_dir, logging) if logging.mlflow else None
        self.last_upload = time.monotonic()

    def log(self, metrics: dict[str, Any], max_steps: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        if self.writer:
            for key, value in metrics.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
        if self.mlflow:
            self.mlflow.log(metrics)
        if self.progress and "reward_mean" in metrics:  # RL: what a rollout earned
            eta = (max_steps - step) * metrics["step_time_s"]
            sys.stdout.write(
                f"[fmray] step {step}/{max_steps} | reward {metrics['reward_mean']:.3f} | "
                f"kl {metrics['kl']:.3f} | reply {metrics['response_length']:.1f} tok | "
                f"generation {metrics['generation_tokens_per_s']:,.0f} tok/s | "
                f"{metrics['step_time_s']:.2f} s/step | ETA {eta:.0f} s\n"
            )
            sys.stdout.flush()
        elif self.progress and "loss" in metrics:
            eta = (max_steps - step) * metrics["step_time_s"]
            val = f" | val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            # Written directly: Ray Train's patched print() echoes each line twice.
            sys.stdout.write(
                f"[fmray] step {step}/{max_steps} | loss {metrics['loss']:.4f}{val} | "
                f"lr {metrics['lr']:.2e} | grad {metrics['grad_norm']:.3f} | "
                f"{metrics['tokens_per_s']:,.0f} tok/s | {metrics['step_time_s']:.3f} s/step | "
                f"ETA {eta:.0f} s\n"
            )
            sys.stdout.flush()
        due = time.monotonic() - self.last_upload > UPLOAD_EVERY_S
        if self.remote and (due or "val_loss" in metrics):
            self.upload()

    def upload(self) -> None:
        """Copy the local record into the remote run folder."""
        if self.writer:
            self.writer.flush()
        storage.write_text(storage.join(self.run_dir, METRICS_FILE), self.path.read_text())
        if self.writer and self.local_dir is not None:
            storage.upload_dir(
                self.local_dir / TENSORBOARD_DIR, storage.join(self.run_dir, TENSORBOARD_DIR)
            )
        self.last_upload = time.monotonic()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.mlflow:
            self.mlflow.close()
        if self.remote:
            self.upload()
            shutil.rmtree(self.local_dir or "", ignore_errors=True)


class MlflowRun:
    """One MLflow run per fmray run: the config as params, every record as metrics.

    The run id is kept in <run dir>/mlflow_run_id, so a resumed run logs into the same MLflow
    run (MLflow keeps each step's newest value). Written through MlflowClient, not MLflow's
    global active run, so nothing else in the process is touched.
    """

    def __init__(self, run_dir: str, logging: LoggingSection) -> None:
        from mlflow.tracking import MlflowClient

        uri = logging.mlflow_tracking_uri or default_tracking_uri(run_dir)
        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked; fmray's default is that local store.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.tracking_uri = uri
        id_file = storage.join(run_dir, MLFLOW_RUN_FILE)
        if storage.is_file(id_file):
            self.run_id = storage.read_text(id_file).strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(logging.mlflow_experiment)
        if experiment is None:
            experiment_id = self.client.create_experiment(logging.mlflow_experiment)
        else:
            experiment_id = experiment.experiment_id
        name = run_dir.rstrip("/").rsplit("/", 1)[-1]
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        storage.write_text(id_file, self.run_id + "\n")
        self.client.set_tag(self.run_id, "fmray.run_dir", run_dir)
        config_file = storage.join(run_dir, "config.yaml")
        if storage.is_file(config_file):
            self.log_config(storage.read_text(config_file))

    def log_config(self, text: str) -> None:
        """The resolved config as dotted params (train.lr = 0.001)."""
        import yaml
        from mlflow.entities import Param

        flat: dict[str, Any] = {}
        flatten(yaml.safe_load(text) or {}, "", flat)
        params = [Param(key, str(value)[:6000]) for key, value in flat.items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(metrics.get("step", 0))
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if key != "step"
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def default_tracking_uri(run_dir: str) -> str:
    """A file store beside the run folders: <run.output_dir>/mlruns."""
    if storage.is_remote(run_dir):
        raise ValueError(
            f"logging.mlflow_tracking_uri must be set when the run folder {run_dir} is remote"
        )
    return (Path(run_dir).resolve().parent / "mlruns").as_uri()


def flatten(tree: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flatten(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value


def print_line(text: str) -> None:
    """A progress line from a worker (rank 0) to the console."""
    # Written directly: Ray Train's patched print() echoes each line twice.
    sys.stdout.write(f"[fmray] {text}\n")
    sys.stdout.flush()
