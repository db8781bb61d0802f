"""Training overhead: `fmray pretrain` (1 worker, ZeRO 0) vs a plain PyTorch loop, one run.

    python bench/train_overhead.py                     # small preset, CPU, ~4 minutes
    python bench/train_overhead.py --preset tiny --steps 60 --threads 2
    python bench/train_overhead.py --preset tiny --steps 20 --ray-full   # Ray with its dashboard

Both sides train the same preset from the same init on the same packed blocks, with the same
batch, optimizer (AdamW), clipping, LR schedule, thread count and number of steps. Steady-state
tokens/s skips the first `--warmup` steps of each. Time-to-first-step is measured from the
launch of the `fmray pretrain` command to its first logged step (Ray start, data packing,
worker start, DeepSpeed init), split into phases: the command runs in a child process that
times fmray's own driver functions (imports, memory check, Ray start, tokenizer, data packing),
and the first metrics record gives the worker side (worker group + DeepSpeed init up to the
loop, then the first step). A second launch reuses the first one's tokenizer and packed blocks
(data.tokenizer, data.cache_dir): the start-up a user sees once data and tokenizer exist.
`--ray-full` starts the embedded Ray with its dashboard and metrics (FMRAY_RAY_DASHBOARD=1), as
before fmray trimmed it. Target: ratio >= 0.98.
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
    parser.add_argument("--ray-full", action="store_true", help="Ray with dashboard + metrics")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args()


# Driver-side functions timed in the child, by phase name.
TIMED = {
    "memory check": ("fmray.distributed.planner", "check_memory"),
    "Ray start": ("fmray.distributed.runtime", "init_ray"),
    "tokenizer": ("fmray.data.tokenizer", "train_tokenizer"),
    "data packing": ("fmray.data.pipeline", "build_packed_data"),
    "fit (to the end)": ("fmray.train.launch", "fit"),
}


def child_main(argv: list[str]) -> None:
    """`fmray pretrain ARGV` with fmray's driver phases timed into $FMRAY_BENCH_PHASES."""
    import importlib

    events: list[tuple[str, float, float]] = []
    phases_path = Path(os.environ["FMRAY_BENCH_PHASES"])

    def timed(name: str, function):
        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return function(*args, **kwargs)
            finally:
                events.append((name, start, time.time()))
                phases_path.write_text(json.dumps(events))

        return wrapper

    from fmray.cli import main as cli_main

    events.append(("imports", float(os.environ["FMRAY_BENCH_LAUNCH"]), time.time()))
    for name, (module, function) in TIMED.items():
        loaded = importlib.import_module(module)
        setattr(loaded, function, timed(name, getattr(loaded, function)))
    cli_main(["pretrain", *argv])


def run_fmray(
    args: argparse.Namespace, workdir: Path, name: str = "bench", extra: tuple[str, ...] = ()
) -> tuple[dict, float, dict[str, float]]:
    """Launch `fmray pretrain`; return its metrics by step, the time to its first step and the
    start-up phases in seconds."""
    overrides = [
        f"run.output_dir={workdir}",
        f"run.name={name}",
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
        *extra,
    ]
    metrics_path = workdir / name / "metrics.jsonl"
    log_path = workdir / f"{name}.log"
    phases_path = workdir / f"{name}-phases.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.ray_full:
        # Ray's full start brings its dashboard, whose token authentication a local bench skips.
        env.update(FMRAY_RAY_DASHBOARD="1", RAY_AUTH_MODE=env.get("RAY_AUTH_MODE", "disabled"))
    launch = time.time()
    env.update(FMRAY_BENCH_PHASES=str(phases_path), FMRAY_BENCH_LAUNCH=str(launch))
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", *overrides],
        cwd=REPO_ROOT,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    first_step_at = float("nan")
    while proc.poll() is None:
        if np.isnan(first_step_at) and metrics_path.is_file() and metrics_path.stat().st_size:
            first_step_at = time.time()
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"fmray pretrain failed:\n{log_path.read_text()[-3000:]}")
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    by_step = {r["step"]: r for r in records}
    return (
        by_step,
        first_step_at - launch,
        startup_phases(phases_path, launch, first_step_at, by_step),
    )


def startup_phases(
    path: Path, launch: float, first_step_at: float, records: dict
) -> dict[str, float]:
    """Seconds per start-up phase, from the child's timed driver calls and the first record
    (its elapsed_s counts from the training loop's start to the end of the logged step)."""
    events = {name: (start, end) for name, start, end in json.loads(path.read_text())}
    phases = {name: end - start for name, (start, end) in events.items() if name in TIMED}
    phases.pop("fit (to the end)", None)
    phases.setdefault("tokenizer", 0.0)  # reused: no tokenizer trained
    phases["imports"] = events["imports"][1] - launch
    first = records[min(records)]
    loop_start = first_step_at - first["elapsed_s"]
    # The first record may be a later step (log_every): its elapsed_s covers all steps before.
    phases["worker group + DeepSpeed init"] = loop_start - events["fit (to the end)"][0]
    phases["first step(s)"] = first["elapsed_s"]
    phases["other driver work"] = (first_step_at - launch) - sum(phases.values())
    return phases


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
    (packed,) = [p for p in (workdir / "cache").iterdir() if (p / "packed.json").is_file()]
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


def print_phases(title: str, phases: dict[str, float], total: float) -> None:
    print(f"start-up, {title}: {total:.1f} s from command launch to the first logged step")
    for name, seconds in phases.items():
        print(f"  {name:<32} {seconds:6.1f} s")


def main() -> None:
    args = parse_args()
    if args.child is not None:
        child_main(args.child)
        return
    if args.steps - args.warmup < 2 * args.log_every:
        raise SystemExit(
            "--steps must exceed --warmup by at least 2 x --log-every (two logged steps after "
            "the warm-up give the steady state)"
        )
    tokens_per_step = args.micro_batch * args.seq_len
    ray_kind = "full Ray (dashboard, metrics)" if args.ray_full else "fmray's trimmed Ray"
    with tempfile.TemporaryDirectory(prefix="fmray-bench-") as tmp:
        workdir = Path(tmp)
        print(f"[bench] fmray pretrain: preset {args.preset}, {args.steps} steps, 1 worker, ZeRO 0")
        records, first_step_s, cold = run_fmray(
            args, workdir, extra=(f"data.cache_dir={workdir / 'cache'}",)
        )
        print("[bench] again, reusing its tokenizer and packed blocks")
        reuse = (
            f"data.cache_dir={workdir / 'cache'}",
            f"data.tokenizer={workdir / 'bench' / 'tokenizer'}",
        )
        _, warm_first_step_s, warm = run_fmray(args, workdir, "bench-warm", reuse)
        print("[bench] plain PyTorch loop on the same blocks")
        plain_times = run_plain(args, workdir)
    print(f"time to first step (fmray)   : {first_step_s:.1f} s from command launch ({ray_kind})")
    print_phases("first run (trains the tokenizer, packs the data)", cold, first_step_s)
    print_phases("second run (tokenizer and packed blocks reused)", warm, warm_first_step_s)
    logged = sorted(s for s in records if s > args.warmup)
    first, last = logged[0], logged[-1]
    fmray_elapsed = records[last]["elapsed_s"] - records[first]["elapsed_s"]
    fmray_tps = (last - first) * tokens_per_step / fmray_elapsed
    plain_tps = steady_tps(plain_times, first, last, tokens_per_step)
    print(f"fmray pretrain   steady state: {fmray_tps:12,.0f} tokens/s (steps {first}..{last})")
    print(f"plain PyTorch    steady state: {plain_tps:12,.0f} tokens/s (same steps)")
    print(f"ratio fmray / plain PyTorch  : {fmray_tps / plain_tps:.3f}  (target >= 0.98)")


if __name__ == "__main__":
    main()
