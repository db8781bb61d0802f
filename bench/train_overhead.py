"""Training overhead: `fmray pretrain` (1 worker, ZeRO 0) vs a plain PyTorch loop, one run.

    python bench/train_overhead.py                     # small preset, CPU, ~3 minutes
    python bench/train_overhead.py --preset tiny --steps 60 --threads 2

Both sides train the same preset from the same init on the same packed blocks, with the same
batch, optimizer (AdamW), clipping, LR schedule, thread count and number of steps. Steady-state
tokens/s skips the first `--warmup` steps of each. Time-to-first-step is measured from the
launch of the `fmray pretrain` command to its first logged step (Ray start, data packing,
worker start, DeepSpeed init). Target: ratio >= 0.98.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from steady state")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    return parser.parse_args()


def run_fmray(args: argparse.Namespace, workdir: Path) -> tuple[dict, float]:
    """Launch `fmray pretrain`; return its metrics by step and the time to its first step."""
    overrides = [
        f"run.output_dir={workdir}",
        "run.name=bench",
        f"model.preset={args.preset}",
        "data.num_documents=6000",
        f"data.seq_len={args.seq_len}",
        "data.vocab_size=1024",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum_steps=1",
        "train.warmup_steps=5",
        f"train.log_every={args.log_every}",
        "train.eval_every=0",
        "zero.stage=0",
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={args.threads}",
        "checkpoint.export_hf=false",
        "logging.tensorboard=false",
    ]
    metrics_path = workdir / "bench" / "metrics.jsonl"
    log_path = workdir / "fmray.log"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmray", "pretrain", *overrides],
        cwd=REPO_ROOT,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    first_step_s = float("nan")
    while proc.poll() is None:
        if np.isnan(first_step_s) and metrics_path.is_file() and metrics_path.stat().st_size:
            first_step_s = time.perf_counter() - start
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"fmray pretrain failed:\n{log_path.read_text()[-3000:]}")
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return {r["step"]: r for r in records}, first_step_s


def run_plain(args: argparse.Namespace, workdir: Path) -> list[float]:
    """The plain PyTorch loop; returns the wall-clock time after each step."""
    from transformers import AutoTokenizer

    from fmray.config import TrainSection
    from fmray.distributed.deepspeed_setup import lr_at
    from fmray.distributed.runtime import seed_everything
    from fmray.models.registry import build_causal_lm

    torch.set_num_threads(args.threads)
    run_dir = workdir / "bench"
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    seed_everything(0)
    model = build_causal_lm(
        args.preset,
        None,
        len(tokenizer),
        {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
    )
    train = TrainSection(max_steps=args.steps, micro_batch_size=args.micro_batch, warmup_steps=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=train.betas, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, train))
    (packed,) = [p for p in (run_dir / "data").iterdir() if (p / "packed.json").is_file()]
    table = pq.read_table(packed / "train").sort_by("index")
    blocks = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
    times = []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = torch.from_numpy(blocks[step * args.micro_batch : (step + 1) * args.micro_batch])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if (step + 1) % args.log_every == 0:
            loss.item()  # the same host sync fmray's logging makes
        times.append(time.perf_counter() - start)
    return times


def steady_tps(times: list[float], first: int, last: int, tokens_per_step: int) -> float:
    return (last - first) * tokens_per_step / (times[last - 1] - times[first - 1])


def main() -> None:
    args = parse_args()
    tokens_per_step = args.micro_batch * args.seq_len
    with tempfile.TemporaryDirectory(prefix="fmray-bench-") as tmp:
        workdir = Path(tmp)
        print(f"[bench] fmray pretrain: preset {args.preset}, {args.steps} steps, 1 worker, ZeRO 0")
        records, first_step_s = run_fmray(args, workdir)
        print("[bench] plain PyTorch loop on the same blocks")
        plain_times = run_plain(args, workdir)
    logged = sorted(s for s in records if s > args.warmup)
    first, last = logged[0], logged[-1]
    fmray_elapsed = records[last]["elapsed_s"] - records[first]["elapsed_s"]
    fmray_tps = (last - first) * tokens_per_step / fmray_elapsed
    plain_tps = steady_tps(plain_times, first, last, tokens_per_step)
    print(f"fmray pretrain   steady state: {fmray_tps:12,.0f} tokens/s (steps {first}..{last})")
    print(f"plain PyTorch    steady state: {plain_tps:12,.0f} tokens/s (same steps)")
    print(f"ratio fmray / plain PyTorch  : {fmray_tps / plain_tps:.3f}  (target >= 0.98)")
    print(f"time to first step (fmray)   : {first_step_s:.1f} s from command launch")


if __name__ == "__main__":
    main()
