"""Rank 0's record of a run: metrics.jsonl, TensorBoard and the progress line.

For a run folder in remote storage the files are written locally and uploaded every
UPLOAD_EVERY_S seconds, at every evaluation and at the end.
"""

from __future__ import annotations

import json
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
        self.last_upload = time.monotonic()

    def log(self, metrics: dict[str, Any], max_steps: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        if self.writer:
            for key, value in metrics.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
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
        if self.remote:
            self.upload()
            shutil.rmtree(self.local_dir or "", ignore_errors=True)


def print_line(text: str) -> None:
    """A progress line from a worker (rank 0) to the console."""
    # Written directly: Ray Train's patched print() echoes each line twice.
    sys.stdout.write(f"[fmray] {text}\n")
    sys.stdout.flush()
