"""GPU benchmark, one JSON: fmray's pretraining step (tokens/s, MFU, peak memory against the
planner) and its serving engine (tokens/s at 1/16/64 concurrent requests against batched HF
`generate`).

    bash bench/gpu.sh                                        # checks, then this (< 8 min, H200)
    python bench/gpu_bench.py --out bench-gpu.json           # this alone, on a CUDA machine
    python bench/gpu_bench.py --cpu-smoke --out smoke.json   # every step on tiny sizes, CPU

No Ray and no DeepSpeed (the GPU machine has neither; Ray's share is bench/train_overhead.py's):
the model is fmray's preset (`build_causal_lm`, llama-1b, 32000-token vocabulary as in
jobs/pretrain/llama_1b.yaml) and the step keeps DeepSpeed's bf16 ZeRO-0 memory layout (bf16
weights and gradients, fp32 master weights and Adam moments), so the planner's
figure for that config is the one to compare. Tokens are random ids: throughput does not depend on
them. MFU = 6 N + 12 L h s FLOPs per token (N: parameters without the input embedding) over the
GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

GiB = 2**30
# Dense bf16 tensor-core peaks (FLOP/s) by device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the JSON goes")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--preset", default=None, help="default: llama-1b (smoke: tiny)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps per variant")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the table")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--concurrency", default=None, help="default 1,16,64 (smoke: 1,4,8)")
    return parser.parse_args()


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    smoke = args.cpu_smoke
    return dict(
        device="cpu" if smoke else "cuda",
        preset=args.preset or ("tiny" if smoke else "llama-1b"),
        vocab=512 if smoke else 32000,
        seq_len=args.seq_len or (64 if smoke else 2048),
        micro=args.micro_batch or (2 if smoke else 8),
        warmup=1 if smoke else 3,
        steps=args.steps or (2 if smoke else 10),
        max_new=args.max_new_tokens or (8 if smoke else 128),
        levels=[int(c) for c in (args.concurrency or ("1,4,8" if smoke else "1,16,64")).split(",")],
        single_repeats=2 if smoke else 4,
    )


def build_model(preset: str, vocab: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from fmray.models.registry import build_causal_lm

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no 5 GB host copy
        return build_causal_lm(preset, None, vocab, {"eos_token_id": 1, "pad_token_id": 0}, dtype)


# ----------------------------------------------------------------------------- pretraining


class MasterWeightAdamW:
    """AdamW over fp32 master copies of bf16 weights: the memory layout of DeepSpeed's bf16
    optimizer wrapper at ZeRO stage 0 (bf16 weights and gradients, fp32 master, m and v: 2 + 2 +
    12 bytes per parameter), whose fp32 gradients live only during the step."""

    def __init__(self, model: torch.nn.Module, lr: float = 3e-4) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        fused = self.params[0].device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, betas=(0.9, 0.95), fused=fused)

    def step(self, grad_clip: float = 1.0) -> None:
        for param, master in zip(self.params, self.master, strict=True):
            master.grad = param.grad.float()
            param.grad = None
        torch.nn.utils.clip_grad_norm_(self.master, grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)
        for master in self.master:
            master.grad = None


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    config = model.config
    embedding = model.get_input_embeddings().weight.numel()
    matmul_params = sum(p.numel() for p in model.parameters()) - embedding
    return 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def planned(s: dict[str, Any], model: torch.nn.Module, checkpointing: bool, budget: int | None):
    """fmray's planner for the same run: one worker, ZeRO-0, bf16 (or fp32 in the smoke run)."""
    from fmray.distributed.planner import Settings, plan_settings
    from fmray.distributed.workload import lm_part, lm_workload

    part, shape = lm_part("model", model.config, "lm", True)
    workload = lm_workload("pretrain", [part], shape, 1, s["seq_len"], "1 block", [])
    settings = Settings(
        stage=0, offload_optimizer=False, offload_params=False, checkpointing=checkpointing,
        micro_batch_size=s["micro"], grad_accum_steps=1, num_workers=1,
        bf16=s["device"] == "cuda", use_gpu=s["device"] == "cuda",
    )  # fmt: skip
    return plan_settings(workload, settings, budget, "this GPU" if budget else "not checked")


def pretrain_variant(s: dict[str, Any], checkpointing: bool, peak: float | None) -> dict[str, Any]:
    device = torch.device(s["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(s["preset"], s["vocab"], s["device"], dtype).train()
    if checkpointing:
        with warnings.catch_warnings():  # renamed after 5.17, the GPU machine's version
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable({"use_reentrant": False})
    optimizer = MasterWeightAdamW(model)
    generator = torch.Generator(device="cpu").manual_seed(0)
    batches = [
        torch.randint(0, s["vocab"], (s["micro"], s["seq_len"]), generator=generator).to(device)
        for _ in range(4)
    ]
    times: list[float] = []
    for step in range(s["warmup"] + s["steps"]):
        start = time.perf_counter()
        batch = batches[step % len(batches)]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        loss_value = loss.item()  # one host sync per step, as fmray's logging makes
        times.append(time.perf_counter() - start)
    step_s = sum(times[s["warmup"] :]) / s["steps"]
    tokens_per_s = s["micro"] * s["seq_len"] / step_s
    flops = flops_per_token(model, s["seq_len"])
    result: dict[str, Any] = {
        "variant": "checkpointing" if checkpointing else "no checkpointing",
        "preset": s["preset"],
        "num_params": sum(p.numel() for p in model.parameters()),
        "micro_batch": s["micro"],
        "seq_len": s["seq_len"],
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "final_loss": round(loss_value, 4),
        "mfu": round(tokens_per_s * flops / peak, 4) if peak else None,
    }
    budget = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else None
    plan = planned(s, model, checkpointing, budget)
    result["planner"] = {row.name: round(row.device / GiB, 3) for row in plan.rows}
    result["planner"]["total"] = round(plan.total / GiB, 3)
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        without_runtime = plan.total - plan.row("runtime").device
        result.update(
            peak_allocated_gib=round(allocated / GiB, 3),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 3),
            device_used_gib=round((total - free) / GiB, 3),
            # The allocator's peak against the planner without its runtime allowance (CUDA
            # context and allocator slack are outside max_memory_allocated).
            peak_vs_planner=round(allocated / without_runtime, 3),
        )
    else:
        result.update(peak_allocated_gib=None, peak_vs_planner=None)
    del model, optimizer, batches
    return result


# ----------------------------------------------------------------------------- serving


def serving(s: dict[str, Any]) -> list[dict[str, Any]]:
    from fmray.generation.engine import LLMEngine
    from fmray.generation.sampling import SamplingParams

    device = torch.device(s["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(s["preset"], s["vocab"], s["device"], dtype).eval()
    generator = torch.Generator().manual_seed(1)
    longest = 256 if device.type == "cuda" else 24
    prompts = [
        torch.randint(2, s["vocab"], (int(torch.randint(8, longest, (1,), generator=generator)),),
                      generator=generator).tolist()
        for _ in range(max(s["levels"]))
    ]  # fmt: skip
    max_new = s["max_new"]
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    context = model.config.max_position_embeddings
    engine = LLMEngine(model, context, max_batch_size=max(s["levels"]))

    def run_engine(batch: list[list[int]]) -> int:
        events = engine.generate_batch(batch, [params] * len(batch))
        return sum(len(seq_events) for seq_events in events)

    def run_generate(batch: list[list[int]]) -> int:
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, prompt in enumerate(batch):  # left padding, as batched generate needs
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                max_new_tokens=max_new, min_new_tokens=max_new, eos_token_id=None,
                pad_token_id=0,
            )  # fmt: skip
        return (out.shape[1] - width) * len(batch)

    def timed(run: Any, batch: list[list[int]], repeats: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, tokens = time.perf_counter(), 0
        for _ in range(repeats):
            tokens += run(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - start)

    for run in (run_engine, run_generate):  # warm-up: kernels, allocator, clocks
        run(prompts[: max(s["levels"])])
        run(prompts[:1])
    results = []
    for level in s["levels"]:
        repeats = s["single_repeats"] if level == 1 else 1
        batch = prompts[:level]
        ours = timed(run_engine, batch, repeats)
        theirs = timed(run_generate, batch, repeats)
        results.append(
            {
                "concurrency": level,
                "max_new_tokens": max_new,
                "fmray_engine_tokens_per_s": round(ours, 1),
                "hf_generate_batched_tokens_per_s": round(theirs, 1),
                "ratio": round(ours / theirs, 3),
            }
        )
        print(f"[gpu_bench] serving c={level}: engine {ours:,.0f} tok/s, generate "
              f"{theirs:,.0f} tok/s, ratio {ours / theirs:.2f}", flush=True)  # fmt: skip
    return results


# ----------------------------------------------------------------------------- main


def environment(s: dict[str, Any], peak: float | None) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cpu",
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "ray_imported": "ray" in sys.modules,
        "deepspeed_imported": "deepspeed" in sys.modules,
    }
    if s["device"] == "cuda":
        env["device"] = torch.cuda.get_device_name(0)
        env["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
    return env


def peak_flops(s: dict[str, Any], override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if s["device"] != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    found = [flops for key, flops in PEAK_BF16.items() if key in name]
    return found[0] if found else None


def main() -> None:
    args = parse_args()
    s = sizes(args)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device visible (use --cpu-smoke on a CPU machine)")
    if s["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    peak = peak_flops(s, args.peak_tflops)
    report: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu"}
    report["environment"] = environment(s, peak)
    report["pretrain"] = []
    for checkpointing in (False, True):
        result = pretrain_variant(s, checkpointing, peak)
        report["pretrain"].append(result)
        print(f"[gpu_bench] pretrain {result['variant']}: {result['tokens_per_s']:,.0f} tok/s, "
              f"MFU {result['mfu']}, peak {result['peak_allocated_gib']} GiB vs planner "
              f"{result['planner']['total']} GiB", flush=True)  # fmt: skip
    report["serving"] = serving(s)
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    report["environment"]["ray_imported"] = "ray" in sys.modules
    report["environment"]["deepspeed_imported"] = "deepspeed" in sys.modules
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"[gpu_bench] wrote {args.out} in {report['elapsed_s']} s", flush=True)


if __name__ == "__main__":
    main()
