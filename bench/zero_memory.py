"""ZeRO 0-3 model-state memory per rank: what DeepSpeed's own partitions hold, against fmray's
planner (`fmray plan`) and the ZeRO paper's formulas, on 2 CPU ranks (gloo, no Ray).

    .venv/bin/python bench/zero_memory.py                        # small preset, fp32, stages 0-3
    .venv/bin/python bench/zero_memory.py --preset tiny --stages 2 3
    .venv/bin/python bench/zero_memory.py --bf16                 # bf16 mixed precision

Each rank builds the preset the way a pretraining worker does (zero.Init under ZeRO-3, fmray's
DeepSpeed config), runs one optimizer step, then a forward and backward, and adds up every
distinct tensor storage DeepSpeed keeps for the model: parameters (the flat 16/32-bit groups, or
ZeRO-3's partitions and the parameters it keeps whole), gradients (param.grad, the reduced
partitions) and optimizer states (the fp32 master partitions and Adam's moments). Communication
buckets (the planner's "DeepSpeed buffers" row) are not model states and are left out here.
The paper's formulas (Rajbhandari et al. 2020, figure 1) use K = 12
bytes per parameter; the ratio line is measured / planned.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_RANKS = 2
CATEGORIES = ("parameters", "gradients", "optimizer states")
MiB = 2**20


def storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    storage = tensor.untyped_storage()
    if tensor.device.type == "meta" or storage.nbytes() == 0:  # shape records, no memory
        return None
    return storage.data_ptr(), storage.nbytes()


def walk_tensors(value: Any, name: str, depth: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Tensors inside an attribute's value (lists, tuples, dicts), named by the attribute."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if depth > 3:
        return []
    found = []
    if isinstance(value, (list, tuple)):
        for item in value:
            found += walk_tensors(item, name, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            found += walk_tensors(item, name, depth + 1)
    return found


def category_of(attribute: str) -> str:
    """Where an optimizer attribute's tensors belong, by DeepSpeed's naming."""
    lowered = attribute.lower()
    if any(word in lowered for word in ("bucket", "ipg", "buffer_of_bit16", "comm")):
        return "buffers"
    if "grad" in lowered:
        return "gradients"
    if any(word in lowered for word in ("bit16", "fp16", "bf16", "lp_")):
        return "parameters"
    return "optimizer states"


def measure(engine: Any) -> dict[str, int]:
    """Bytes of distinct storages per category (a storage is counted once, first category wins)."""
    seen: set[tuple[int, int]] = set()
    totals = dict.fromkeys((*CATEGORIES, "buffers"), 0)

    def add(category: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        key = storage_key(tensor)
        if key is not None and key not in seen:
            seen.add(key)
            totals[category] += key[1]

    for param in engine.module.parameters():
        add("parameters", getattr(param, "ds_tensor", None))
        add("parameters", param.data)
    for param in engine.module.parameters():
        add("gradients", param.grad)
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    named = []
    if optimizer is not inner:
        for attribute, value in vars(optimizer).items():
            named += walk_tensors(value, attribute)
    order = {"parameters": 0, "gradients": 1, "optimizer states": 2, "buffers": 3}
    named.sort(key=lambda item: order[category_of(item[0])])
    for attribute, tensor in named:
        add(category_of(attribute), tensor)
        if tensor.grad is not None:
            add("gradients", tensor.grad)
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                add("optimizer states", value)
    return totals


def rank_main(rank: int, port: int, args: argparse.Namespace, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(NUM_RANKS), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(NUM_RANKS),
    )  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed

    from fmray.config import load_config
    from fmray.distributed.deepspeed_setup import build_ds_config
    from fmray.models.registry import build_causal_lm
    from fmray.train.pretrain import PretrainConfig
    from fmray.train.worker import build_train_engine, zero3_construction

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in args.stages:
        config = load_config(PretrainConfig, None, overrides(args, stage))
        ds_config = build_ds_config(config.train, config.zero, NUM_RANKS, use_gpu=False)
        torch.manual_seed(0)
        with zero3_construction(ds_config):
            model = build_causal_lm(args.preset, None, args.vocab_size, dtype=torch.float32)
        engine = build_train_engine(model, ds_config, config.train)
        ids = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_len))
        for step in range(2):
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
            if step == 0:
                engine.step()
        # Measured after backward, before the step: gradients and optimizer states both exist.
        results[(stage, rank)] = measure(engine)
        del engine, model
        torch.distributed.barrier()


def overrides(args: argparse.Namespace, stage: int) -> list[str]:
    return [
        f"model.preset={args.preset}",
        f"zero.stage={stage}",
        f"train.bf16={str(args.bf16).lower()}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"data.seq_len={args.seq_len}",
        f"data.vocab_size={args.vocab_size}",
        f"scaling.num_workers={NUM_RANKS}",
    ]


def paper_bytes(num_params: int, stage: int, bf16: bool) -> dict[str, float]:
    """The ZeRO paper's per-device model states (figure 1), p bytes per weight and gradient."""
    p, k, n = (2 if bf16 else 4), 12, NUM_RANKS
    return {
        "parameters": p * num_params / (n if stage == 3 else 1),
        "gradients": p * num_params / (n if stage >= 2 else 1),
        "optimizer states": k * num_params / (n if stage >= 1 else 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from fmray.config import load_config
    from fmray.distributed.planner import plan_config
    from fmray.train.pretrain import PretrainConfig

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(port, args, results), nprocs=NUM_RANKS, join=True)

    print(f"ZeRO model states per rank, {args.preset} preset, {NUM_RANKS} CPU ranks, "
          f"{'bf16' if args.bf16 else 'fp32'} (MiB; ratio = measured / planned)")  # fmt: skip
    header = f"{'stage':>5} {'rank':>4} {'state':<17} {'measured':>9} {'planner':>9} {'paper':>9}"
    print(header + f" {'ratio':>6} {'vs paper':>8}")
    worst = 0.0
    for stage in args.stages:
        config = load_config(PretrainConfig, None, overrides(args, stage))
        plan = plan_config("pretrain", config)
        num_params = sum(p.num_params for p in _workload(config).parts)
        paper = paper_bytes(num_params, stage, args.bf16)
        for rank in range(NUM_RANKS):
            measured = results[(stage, rank)]
            for name in (*CATEGORIES, "total"):
                if name == "total":
                    got = sum(measured[c] for c in CATEGORIES)
                    planned = sum(plan.row(c).device + plan.row(c).host for c in CATEGORIES)
                    formula = sum(paper.values())
                else:
                    got = measured[name]
                    planned = plan.row(name).device + plan.row(name).host
                    formula = paper[name]
                ratio = got / planned if planned else float("nan")
                if name == "total":
                    worst = max(worst, abs(ratio - 1.0))
                print(
                    f"{stage:>5} {rank:>4} {name:<17} {got / MiB:>9.2f} {planned / MiB:>9.2f} "
                    f"{formula / MiB:>9.2f} {ratio:>6.3f} {got / formula:>8.3f}"
                )
    print(f"largest deviation of the planner's total from measured: {worst:.1%} (goal <= 10%)")


def _workload(config: Any) -> Any:
    from fmray.distributed.workload import workload_of

    return workload_of("pretrain", config)


if __name__ == "__main__":
    main()
