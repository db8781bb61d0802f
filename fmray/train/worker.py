"""What every recipe's worker does before its loop, and the engines it builds.

Engine building, in order: (1) `zero3_construction` around the model build, so under ZeRO-3
transformers creates parameters already partitioned (`zero.Init`) and a large model never
exists whole on one rank; (2) recipe-specific wrapping (LoRA, heads); (3) `build_train_engine`
(optimizer + LR schedule) for what trains, `build_frozen_engine` (no optimizer) for frozen
reference and reward models.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fmray.config import TrainSection


@dataclass(frozen=True)
class Worker:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def setup_worker(seed: int, use_gpu: bool) -> Worker:
    """Distributed init (nccl on GPU, gloo on CPU; DeepSpeed reuses Ray Train's process group)
    and the same seed on every rank, so fresh weights are identical everywhere."""
    import ray.train

    from fmray.distributed.deepspeed_setup import import_deepspeed
    from fmray.distributed.runtime import seed_everything

    deepspeed = import_deepspeed()

    # torch 2.13 deprecates the collectives DeepSpeed's ZeRO-3 calls every step; the warning
    # would flood the console (one per call and rank) with nothing for the user to do.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    seed_everything(seed)
    return Worker(context.get_world_rank(), context.get_world_size(), device)


@contextmanager
def zero3_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Build models inside this block to have ZeRO-3 partition them as they are created.

    transformers consults a process-wide DeepSpeed config while it constructs a model; it is
    set for this block only, so a later model (a frozen reference, a reward model) is built
    under the config meant for it.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    active = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del active


def build_train_engine(
    model: torch.nn.Module, ds_config: dict[str, Any], train: TrainSection
) -> Any:
    """A DeepSpeed engine that trains `model`'s parameters with requires_grad."""
    import deepspeed

    from fmray.distributed.deepspeed_setup import build_scheduler

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, train),
    )
    return engine


def build_frozen_engine(model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """An inference-only engine (no optimizer, no gradients) for a frozen model: under ZeRO-3
    its parameters stay partitioned and are gathered layer by layer in each forward."""
    import deepspeed

    from fmray.distributed.deepspeed_setup import frozen_ds_config

    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=frozen_ds_config(ds_config))
    engine.eval()
    return engine


def apply_schedule(engine: Any, train: TrainSection) -> None:
    """Set the optimizer's LR and weight decay from `train` at the engine's current step.

    After a resume this is a no-op for the same config; for a Tune PBT clone it makes the
    mutated values take effect from the cloned step on.
    """
    from fmray.distributed.deepspeed_setup import lr_at

    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [train.lr for _ in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] = train.lr * lr_at(scheduler.last_epoch, train)
        group["weight_decay"] = train.weight_decay


def grad_norm_of(module: torch.nn.Module) -> float:
    """Global gradient norm before clipping (ZeRO stages report theirs; stage 0 does not)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def rank_share(items: list[Any], rank: int, world: int) -> tuple[list[Any], int]:
    """This rank's strided share, padded to the common size; also how many are its own.

    Equal sizes keep every rank's forward passes in step (ZeRO-3 gathers weights per forward).
    """
    share = items[rank::world]
    size = -(-len(items) // world)
    return share + items[: size - len(share)], len(share)


def read_eval_rows(
    rank: int, world: int, micro: int, plan: Any, columns: tuple[str, ...]
) -> list[dict[str, Any]]:
    """This rank's held-out micro-batches, read once: they are few and read every evaluation."""
    import ray.train

    from fmray.data.pipeline import iter_micro_batches, rank_block_indices

    limit = plan.num_eval_batches * micro * world
    return list(
        iter_micro_batches(
            ray.train.get_dataset_shard(f"eval_rank{rank}"),
            micro,
            0,
            rank_block_indices(rank, world, micro, 0, limit),
            columns,
        )
    )


def all_reduce_sums(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    """Each value summed over all ranks, in one collective."""
    import torch.distributed as dist

    totals = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).to(device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.tolist()
