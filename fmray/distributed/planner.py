"""Memory planner: the bytes each worker's device holds during a training run, before it starts.

    fmray plan --config jobs/pretrain/llama_7b.yaml --gpu-memory 80GiB
    fmray plan --config jobs/pretrain/tiny.yaml zero.stage=3        # CPU: host memory per worker

    from fmray.distributed.planner import plan_config
    plan = plan_config("pretrain", config)          # -> Plan: .fits, .total, .table(), .suggestion

Model states follow the ZeRO paper (Rajbhandari et al. 2020, section 3 and figure 1) as
DeepSpeed implements them, for Psi parameters on N workers with p bytes per parameter (2 in
bf16, 4 in fp32) and K = 12 bytes of Adam state per trained parameter (fp32 master copy,
momentum, variance):
    stage 0: p Psi + p Psi + K' Psi   (K' = 8 in fp32: torch's AdamW updates the weights
                                       themselves; K' = K = 12 in bf16: DeepSpeed's bf16 wrapper
                                       keeps a fp32 master copy beside Adam's moments)
    stage 1: p Psi + p Psi + K Psi / N  (DeepSpeed: p Psi + (p + K) Psi / N, as stage 2: it
                                       reduces gradients into each rank's partition)
    stage 2: p Psi + (p + K) Psi / N
    stage 3: (p + p + K) Psi / N       (+ the parameters below the persistence threshold, whole)
Offload moves the optimizer (and with it the fp32 gradient partition) or the parameters into
host memory. Activations come from fmray.distributed.workload; DeepSpeed's communication
buckets and a runtime allowance complete the figure.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from typing import Any

from fmray.config import ConfigError
from fmray.distributed.workload import ModelPart, Workload, workload_of

GiB = 2**30
# DeepSpeed's defaults (zero_optimization.reduce_bucket_size, stage3_prefetch_bucket_size).
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
# CUDA context, cuBLAS workspaces and allocator slack on a GPU; torch, transformers, DeepSpeed
# and the Ray worker's own Python heap on a CPU worker.
RUNTIME_BYTES = {True: 1 * GiB, False: GiB // 2}
# Relative cost of each change the planner may suggest (slower steps or more hardware),
# so "cheapest" has a meaning: stages 1-2 communicate what DDP does (ZeRO paper, 7.2); a
# halved micro-batch (with doubled accumulation) runs smaller matmuls; checkpointing repeats
# the forward (~1/3 more compute); stage 3 moves 1.5x the data; offload crosses PCIe each
# step; twice the workers is twice the devices.
COSTS = {
    "stage12": 0.01,
    "halve_micro": 0.05,
    "checkpointing": 0.33,
    "stage3": 0.5,
    "offload_optimizer": 1.0,
    "offload_params": 2.0,
    "double_workers": 1.0,
}


@dataclass(frozen=True)
class Settings:
    """The knobs of a config that memory depends on (and that a suggestion may change)."""

    stage: int
    offload_optimizer: bool
    offload_params: bool
    checkpointing: bool
    micro_batch_size: int
    grad_accum_steps: int
    num_workers: int
    bf16: bool
    use_gpu: bool

    @classmethod
    def of(cls, config: Any) -> Settings:
        return cls(
            stage=config.zero.stage,
            offload_optimizer=config.zero.offload_optimizer,
            offload_params=config.zero.offload_params,
            checkpointing=config.model.gradient_checkpointing,
            micro_batch_size=config.train.micro_batch_size,
            grad_accum_steps=config.train.grad_accum_steps,
            num_workers=config.scaling.num_workers,
            bf16=config.train.bf16,
            use_gpu=config.scaling.use_gpu,
        )

    def overrides(self, base: Settings) -> list[str]:
        """The dotted overrides that turn `base` into these settings."""
        keys = [
            ("zero.stage", "stage"),
            ("zero.offload_optimizer", "offload_optimizer"),
            ("zero.offload_params", "offload_params"),
            ("model.gradient_checkpointing", "checkpointing"),
            ("train.micro_batch_size", "micro_batch_size"),
            ("train.grad_accum_steps", "grad_accum_steps"),
            ("scaling.num_workers", "num_workers"),
        ]
        changed = []
        for key, name in keys:
            value = getattr(self, name)
            if value != getattr(base, name):
                changed.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return changed


@dataclass(frozen=True)
class Row:
    name: str
    device: int
    """Bytes per worker on its device (GPU memory, or host memory on a CPU run)."""
    host: int
    """Bytes per worker offloaded to host memory."""
    how: str


@dataclass
class Plan:
    recipe: str
    settings: Settings
    rows: list[Row]
    budget: int | None
    """Bytes one worker's device offers (None: unknown, so fits is None)."""
    budget_source: str
    activation_note: str
    suggestion: Suggestion | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Per-worker bytes on the device (on a CPU run, offloaded bytes too: same memory)."""
        device = sum(row.device for row in self.rows)
        return device if self.settings.use_gpu else device + self.host_total

    @property
    def host_total(self) -> int:
        return sum(row.host for row in self.rows)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)

    def table(self) -> str:
        return format_plan(self)


@dataclass(frozen=True)
class Suggestion:
    overrides: list[str]
    total: int
    cost: float


# ----------------------------------------------------------------------------- model states


def model_state_rows(parts: list[ModelPart], s: Settings) -> list[Row]:
    """Parameters, gradients, optimizer states (with master weights) and EMA copies."""
    p = 2 if s.bf16 else 4
    n = s.num_workers
    params = grads = optim = ema = 0
    params_host = optim_host = 0
    for part in parts:
        bytes_per = 4 if part.fp32 else p
        if not part.engine:
            params += part.num_params * bytes_per
            continue
        if s.stage == 3:
            partition = part.num_params * p // n
            if s.offload_params:
                params_host += partition
                params += part.num_persistent * p
            else:
                params += partition + part.num_persistent * p
        else:
            params += part.num_params * p
        trained = part.num_trainable
        if trained == 0:
            continue
        # DeepSpeed reduces stage-1 gradients into the rank's partition as stage 2 does
        # (measured by bench/zero_memory.py); the paper's stage 1 keeps them whole.
        grads += trained * p // (n if s.stage >= 1 else 1)
        if s.stage == 0:
            state = trained * (12 if s.bf16 else 8)
        else:
            state = trained * 12 // n
        if s.offload_optimizer:
            optim_host += state
        else:
            optim += state
        if part.ema:
            ema += trained * 4
    what = f"{p} B x params" + (f" / {n} workers" if s.stage == 3 else "")
    grad_what = f"{p} B x trained params" + (f" / {n} workers" if s.stage >= 1 else "")
    optim_what = (
        f"{12 if s.bf16 else 8} B x trained params (stage 0)"
        if s.stage == 0
        else f"12 B x trained params / {n} workers (fp32 master, Adam m, v)"
    )
    rows = [
        Row("parameters", params, params_host, what),
        Row("gradients", grads, 0, grad_what),
        Row("optimizer states", optim, optim_host, optim_what),
    ]
    if ema:
        rows.append(Row("EMA weights", ema, 0, "4 B x trained params, every rank"))
    return rows


def buffer_row(parts: list[ModelPart], s: Settings) -> Row:
    """DeepSpeed's gradient reduce bucket per trained engine (stages 1-3; a CPU run touches
    only what the gradients fill) and ZeRO-3's gathered working set (prefetch + one module)."""
    p = 2 if s.bf16 else 4
    total = 0
    for part in parts:
        if not part.engine:
            continue
        if part.num_trainable and s.stage >= 1:
            bucket = REDUCE_BUCKET if s.use_gpu else min(REDUCE_BUCKET, part.num_trainable)
            total += bucket * p
        if s.stage == 3:
            total += min(part.num_params, PREFETCH_BUCKET + part.largest_module) * p
    how = "reduce bucket per trained engine" + (" + ZeRO-3 gather/prefetch" if s.stage == 3 else "")
    return Row("DeepSpeed buffers", total if s.stage >= 1 else 0, 0, how if s.stage else "none")


def plan_settings(workload: Workload, s: Settings, budget: int | None, budget_source: str) -> Plan:
    rows = model_state_rows(workload.parts, s)
    rows.append(buffer_row(workload.parts, s))
    activations = workload.activations(s.micro_batch_size, s.checkpointing, s.bf16)
    ckpt = "checkpointing on" if s.checkpointing else "no checkpointing"
    rows.append(Row("activations", activations, 0, f"micro-batch {s.micro_batch_size}, {ckpt}"))
    runtime = RUNTIME_BYTES[s.use_gpu]
    rows.append(Row("runtime", runtime, 0, "CUDA context + allocator" if s.use_gpu else "process"))
    return Plan(
        workload.recipe, s, rows, budget, budget_source, workload.activation_note,
        notes=list(dict.fromkeys(workload.notes)),
    )  # fmt: skip


# ----------------------------------------------------------------------------- suggestions


def candidate_settings(s: Settings) -> list[tuple[Settings, float]]:
    """Every combination of changes that only lowers per-device memory, with its cost."""
    stages = [(s.stage, 0.0)] + [
        (stage, COSTS["stage3"] if stage == 3 else COSTS["stage12"])
        for stage in range(s.stage + 1, 4)
    ]
    halvings = []
    micro, cost = s.micro_batch_size, 0.0
    while True:
        halvings.append((micro, s.grad_accum_steps * s.micro_batch_size // micro, cost))
        if micro == 1:
            break
        micro, cost = max(1, micro // 2), cost + COSTS["halve_micro"]
    checkpointing = _switch(s.checkpointing, "checkpointing")
    opt = _switch(s.offload_optimizer, "offload_optimizer")
    par = _switch(s.offload_params, "offload_params")
    workers = [(s.num_workers * 2**k, k * COSTS["double_workers"]) for k in range(4)]
    found = []
    for (stage, c1), (m, accum, c2), (ck, c3), (oo, c4), (op, c5), (w, c6) in itertools.product(
        stages, halvings, checkpointing, opt, par, workers
    ):
        if (oo and stage == 0) or (op and stage != 3):
            continue
        if w != s.num_workers and stage == 0:
            continue  # more workers do not lower a stage-0 worker's memory
        option = replace(
            s, stage=stage, micro_batch_size=m, grad_accum_steps=accum, checkpointing=ck,
            offload_optimizer=oo, offload_params=op, num_workers=w,
        )  # fmt: skip
        found.append((option, c1 + c2 + c3 + c4 + c5 + c6))
    return found


def _switch(current: bool, cost_key: str) -> list[tuple[bool, float]]:
    return [(current, 0.0)] + ([] if current else [(True, COSTS[cost_key])])


def cheapest_fit(workload: Workload, plan: Plan) -> Suggestion | None:
    """The lowest-cost change of the config that fits the same budget (None: nothing fits)."""
    if plan.budget is None:
        return None
    best: Suggestion | None = None
    for option, cost in candidate_settings(plan.settings):
        if option == plan.settings or (best is not None and cost >= best.cost):
            continue
        if not option.use_gpu and option.num_workers != plan.settings.num_workers:
            continue  # on CPU the workers share one host: more of them do not add memory
        tried = plan_settings(workload, option, plan.budget, plan.budget_source)
        if tried.fits:
            best = Suggestion(option.overrides(plan.settings), tried.total, cost)
    return best


# ----------------------------------------------------------------------------- entry points


def parse_size(text: str, key: str = "--gpu-memory") -> int:
    """'80GiB', '80GB', '80G', '1.5TiB', '1073741824' -> bytes; ConfigError naming `key`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match or (match.group(3) and not match.group(2)):
        raise ConfigError(
            f"config error: {key}={text!r} is not a size (e.g. 80GiB, 141GB, 24G, 1073741824)"
        )
    number, unit, binary = match.groups()
    power = "KMGT".index(unit.upper()) + 1 if unit else 0
    base = 1000 if unit and not binary and text.strip().upper().endswith("B") else 1024
    return int(float(number) * base**power)


def host_memory_per_worker(num_workers: int) -> int:
    """Available host memory divided among the workers (Linux /proc/meminfo, else psutil)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // num_workers
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available // num_workers


def device_budget(config: Any, gpu_memory: str | None = None) -> tuple[int | None, str]:
    """Bytes one worker's device offers, and where that figure came from."""
    given = gpu_memory or config.scaling.device_memory
    if given is not None:
        key = "--gpu-memory" if gpu_memory else "scaling.device_memory"
        return parse_size(given, key), f"{key}={given}"
    if not config.scaling.use_gpu:
        workers = config.scaling.num_workers
        return host_memory_per_worker(workers), f"available host memory / {workers} workers"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"this machine's {props.name}"
    return None, "unknown (no GPU here: set --gpu-memory or scaling.device_memory)"


def plan_config(
    recipe: str,
    config: Any,
    gpu_memory: str | None = None,
    model_preset: str | None = None,
) -> Plan:
    """The Plan of a validated recipe config (with the cheapest change that fits, if needed)."""
    workload = workload_of(recipe, config, model_preset)
    budget, source = device_budget(config, gpu_memory)
    plan = plan_settings(workload, Settings.of(config), budget, source)
    if plan.fits is False:
        plan.suggestion = cheapest_fit(workload, plan)
    return plan


def check_memory(config: Any) -> None:
    """Pre-flight: raise ConfigError with the plan's table and its suggestion when the run will
    not fit the devices it asks for; skipped with scaling.memory_check=false."""
    if not config.scaling.memory_check:
        return
    plan = plan_config(recipe_of(config), config)
    if plan.fits is None:
        print(f"[fmray] memory check skipped: device memory {plan.budget_source}", flush=True)
    if plan.fits is False:
        raise ConfigError(
            f"{plan.table()}\nconfig error: the run needs {gib(plan.total)} per worker but "
            f"{plan.budget_source} gives {gib(plan.budget or 0)}; "
            + suggestion_text(plan)
            + " (scaling.memory_check=false runs it anyway)"
        )


def recipe_of(config: Any) -> str:
    """The registry's name of the recipe whose config class `config` is."""
    from fmray.recipes import COMMANDS, Recipe

    for name, command in COMMANDS.items():
        if isinstance(command, Recipe) and command.config_class == type(config).__name__:
            return name
    raise ConfigError(f"fmray plan: {type(config).__name__} is no recipe's config")


# ----------------------------------------------------------------------------- output


def gib(num_bytes: int) -> str:
    if num_bytes >= GiB // 10:
        return f"{num_bytes / GiB:.2f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"


def suggestion_text(plan: Plan) -> str:
    if plan.suggestion is None:
        return "no change within reach fits (try a smaller model or larger devices)"
    changes = " ".join(plan.suggestion.overrides)
    return f"cheapest change that fits: {changes} ({gib(plan.suggestion.total)} per worker)"


def format_plan(plan: Plan) -> str:
    s = plan.settings
    device = "GPU" if s.use_gpu else "CPU (host memory)"
    precision = "bf16" if s.bf16 else "fp32"
    offloaded = (("optimizer", s.offload_optimizer), ("params", s.offload_params))
    offload = [name for name, on in offloaded if on]
    workers = f"{s.num_workers} worker" + ("s" if s.num_workers > 1 else "")
    lines = [
        f"fmray plan: {plan.recipe}, {workers} on {device}, ZeRO-{s.stage}, "
        f"{precision}, offload {', '.join(offload) or 'none'}, micro-batch {s.micro_batch_size} "
        f"x {s.grad_accum_steps} accumulation",
        f"  {'per worker':<18} {'device':>11} {'host':>11}  how",
    ]
    for row in plan.rows:
        host = gib(row.host) if row.host else "-"
        lines.append(f"  {row.name:<18} {gib(row.device):>11} {host:>11}  {row.how}")
    lines.append(f"  {'total':<18} {gib(plan.total):>11} {gib(plan.host_total):>11}")
    lines.append(f"  activations: {plan.activation_note}")
    lines.extend(f"  note: {note}" for note in plan.notes)
    budget = gib(plan.budget) if plan.budget is not None else "?"
    verdict = {True: "fits", False: "does NOT fit", None: "fit unknown"}[plan.fits]
    lines.append(f"  device budget {budget} ({plan.budget_source}): {verdict}")
    if plan.fits is False:
        lines.append(f"  {suggestion_text(plan)}")
    return "\n".join(lines)
