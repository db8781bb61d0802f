"""Two Ray nodes on one machine (a head and a worker node, separate raylets with their own CPUs,
token auth on): a 2-worker ZeRO-3 pretrain places one worker on each node, writes its
checkpoints into the storage both nodes share, and, with the worker node killed mid-run (its
raylet and workers), restarts from its last checkpoint once a node rejoins and ends with the loss
curve and the weights of an uninterrupted plain single-process PyTorch loop.

The driver is `fmray pretrain --address HEAD` in a subprocess, so the session's local Ray
instance (tests/ray/conftest.py) is neither used nor disturbed. One Ray Train fit: the
uninterrupted reference is the plain loop, which the same fit matches before the kill as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from fmray.config import load_config
from fmray.train.pretrain import PretrainConfig
from tests.ray.local_cluster import LocalCluster, Node
from tests.ray.test_pretrain import reference_run

pytestmark = pytest.mark.ray

STEPS = 20
# A worker needs 2 CPUs: the head (3 CPUs) fits one, the worker node (2 CPUs) the other, so
# the two ranks are on different nodes whatever Ray's placement strategy.
HEAD_CPUS, NODE_CPUS = 3, 2
# ZeRO-3 over 2 ranks vs one process: the same sums in another order.
WEIGHT_ATOL = 1e-4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    nodes = LocalCluster(tmp_path_factory.mktemp("multinode"), head_cpus=HEAD_CPUS)
    try:
        nodes.start_head()
        nodes.add_worker_node(NODE_CPUS)
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multinode_runs")


def overrides(workdir: Path, init_dir: Path, name: str) -> list[str]:
    return [
        f"run.name={name}",
        f"run.output_dir={workdir / 'runs'}",
        f"model.path={init_dir}",
        f"data.tokenizer={init_dir}",
        f"data.cache_dir={workdir / 'data'}",
        "data.num_documents=600",
        "data.seq_len=64",
        "data.val_fraction=0.1",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
        f"train.max_steps={STEPS}",
        "train.lr=3e-3",
        "train.warmup_steps=5",
        "train.log_every=1",
        "train.eval_every=10",
        "train.eval_batches=2",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=4",
        "zero.stage=3",
        "scaling.num_workers=2",
        f"scaling.cpus_per_worker={NODE_CPUS}",
        "scaling.max_failures=1",
        "logging.tensorboard=false",
    ]


def pretrain(cluster: LocalCluster, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fmray", "pretrain", "--address", cluster.gcs_address, *args],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def workers_on(node: Node) -> int:
    count = 0
    for proc in node.descendants():
        try:
            count += "RayTrainWorker" in " ".join(proc.cmdline())
        except psutil.Error:
            pass
    return count


def watch_placement(cluster: LocalCluster, seen: list[tuple[int, int]], done: threading.Event):
    """Record (workers on the head, workers on the worker node) while the run is on."""
    head, node = cluster.nodes[0], cluster.nodes[1]
    while not done.is_set():
        seen.append((workers_on(head), workers_on(node)))
        time.sleep(0.5)


def losses_of(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged again after a restart keeps its latest value."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def kill_node_after(cluster: LocalCluster, run_dir: Path, step: int, log: list[str]) -> None:
    """Once Ray Train has registered the run's checkpoint at `step` (the one a restart resumes
    from), SIGKILL the worker node, then start a fresh one."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    name = f"checkpoint_{step:08d}"
    deadline = time.time() + 400
    while not (snapshot.is_file() and name in snapshot.read_text()):
        if time.time() > deadline:
            log.append(f"timed out waiting for {name}")
            return
        time.sleep(0.1)
    node = cluster.nodes[1]
    log.append(f"killing the worker node ({workers_on(node)} training worker on it)")
    node.kill()
    cluster.nodes.remove(node)
    cluster.add_worker_node(NODE_CPUS)
    log.append("a new worker node joined")


def test_zero3_across_two_nodes_survives_a_killed_node_as_plain_pytorch(
    cluster: LocalCluster, workdir: Path, tiny_model_dir: Path
) -> None:
    log: list[str] = []
    seen: list[tuple[int, int]] = []
    done = threading.Event()
    run_dir = workdir / "runs" / "two-nodes"
    watcher = threading.Thread(target=watch_placement, args=(cluster, seen, done))
    killer = threading.Thread(target=kill_node_after, args=(cluster, run_dir, 10, log))
    watcher.start()
    killer.start()
    try:
        run = pretrain(cluster, overrides(workdir, tiny_model_dir, "two-nodes"))
        console, _ = run.communicate(timeout=600)
    finally:
        killer.join()
        done.set()
        watcher.join()
    assert run.returncode == 0, console[-5000:]

    # One rank per node: the workers never shared a node.
    assert (1, 1) in seen, "the two ranks never ran on different nodes"
    assert (2, 0) not in seen and (0, 2) not in seen

    # Both ranks wrote their shard of each checkpoint into the storage the nodes share.
    checkpoint = run_dir / f"checkpoint_{STEPS:08d}"
    assert sorted(p.name for p in (checkpoint / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
    shards = sorted(p.name for p in (checkpoint / "modules").rglob("*optim_states.pt"))
    assert len(shards) == 2
    assert any("rank_0" in s for s in shards) and any("rank_1" in s for s in shards)

    # The worker node died after the step-10 checkpoint; the run went on from it.
    assert log[:1] == ["killing the worker node (1 training worker on it)"], log
    assert log[-1] == "a new worker node joined", log
    final_meta = json.loads((checkpoint / "fmray.json").read_text())
    assert final_meta["resumed_from_step"] == 10, console[-5000:]
    assert "[fmray] resumed from step 10" in console

    # Its losses (steps 11-20 as logged after the restart) and final weights are those of the
    # uninterrupted plain PyTorch loop.
    config = load_config(PretrainConfig, None, overrides(workdir, tiny_model_dir, "two-nodes"))
    (packed_root,) = [p for p in (workdir / "data").iterdir() if (p / "packed.json").is_file()]
    expected, weights = reference_run(tiny_model_dir, packed_root, config)
    got = losses_of(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert np.max(np.abs(np.array([got[s] for s in sorted(got)]) - np.array(expected))) <= 1e-4
    assert got[STEPS] < got[1] - 0.5  # it learned
    resumed = load_file(str(checkpoint / "hf" / "model.safetensors"))
    assert weights.keys() == resumed.keys()
    for key, value in weights.items():
        assert torch.allclose(value, resumed[key], atol=WEIGHT_ATOL, rtol=0), key
