"""Training faults that need no Ray (one process, gloo, real DeepSpeed engines): damaged
checkpoints are named and skipped, a full disk stops a save without touching the previous
checkpoint, RNG states load with weights_only=True, and a worker that dies under a Ray Train
controller call is fitted again within `scaling.max_failures`.

The same paths through `fmray pretrain` on Ray: tests/ray/test_pretrain.py (a damaged newest
checkpoint falls back to the one before it)."""

from __future__ import annotations

import contextlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fmray.checkpoint.format import (
    CheckpointDamagedError,
    CheckpointWriteError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fmray.config import load_config
from fmray.train.checkpointing import load_newest_intact
from fmray.train.launch import fit
from fmray.train.pretrain import PretrainConfig
from tests.unit.test_checkpoint_format import engine_for, train_step

pytestmark = pytest.mark.usefixtures("single_process_group")


def save_at(engine: Any, run_dir: Path, step: int) -> Path:
    ckpt = run_dir / f"checkpoint_{step:08d}"
    ckpt.mkdir(parents=True)
    save_checkpoint(ckpt, step, {"model": engine}, "causal_lm", "train: {}\n", {"run": "unit"})
    return ckpt


def weights(engine: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def optimizer_file(ckpt: Path) -> Path:
    (path,) = (ckpt / "modules").rglob("*optim_states.pt")
    return path


class Registered:
    """What ray.train.get_checkpoint() hands a worker: a path and as_directory()."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def as_directory(self) -> contextlib.AbstractContextManager[str]:
        return contextlib.nullcontext(self.path)


@pytest.fixture()
def two_checkpoints(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    """A ZeRO-2 run folder with checkpoints at steps 2 and 4, and the weights at step 2."""
    engine = engine_for(tiny_model_dir, 2)
    for step in range(2):
        train_step(engine, step)
    save_at(engine, tmp_path / "run", 2)
    at_2 = weights(engine)
    for step in range(2, 4):
        train_step(engine, step)
    save_at(engine, tmp_path / "run", 4)
    yield tmp_path / "run", at_2


def test_a_truncated_or_corrupted_file_is_named_never_loaded(
    two_checkpoints: tuple[Path, dict], tiny_model_dir: Path
) -> None:
    run_dir, _ = two_checkpoints
    newest = run_dir / "checkpoint_00000004"
    target = optimizer_file(newest)
    data = target.read_bytes()
    engine = engine_for(tiny_model_dir, 2)

    target.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointDamagedError, match=rf"{target.name}: \d+ bytes, \d+ written"):
        load_checkpoint(newest, {"model": engine}, "causal_lm")

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, one byte changed
    target.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointDamagedError, match=rf"{target.name}: .*CRC-32 mismatch"):
        load_checkpoint(newest, {"model": engine}, "causal_lm")

    target.unlink()
    with pytest.raises(CheckpointDamagedError, match=rf"{target.name}: missing"):
        load_checkpoint(newest, {"model": engine}, "causal_lm")

    target.write_bytes(data)
    (newest / "manifest" / "rank0.json").unlink()  # a copy that stopped half-way
    with pytest.raises(CheckpointDamagedError, match="incomplete, no manifest of rank"):
        load_checkpoint(newest, {"model": engine}, "causal_lm")


def test_resume_falls_back_to_the_newest_intact_checkpoint(
    two_checkpoints: tuple[Path, dict], tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, at_2 = two_checkpoints
    newest = run_dir / "checkpoint_00000004"
    target = optimizer_file(newest)
    target.write_bytes(target.read_bytes()[:100])

    engine = engine_for(tiny_model_dir, 2)
    step = load_newest_intact(Registered(newest), str(run_dir), {"model": engine}, "causal_lm", {})
    assert step == 2
    for key, value in weights(engine).items():
        assert torch.equal(value, at_2[key]), key
    out = capsys.readouterr().out
    assert f"checkpoint damaged: checkpoint_00000004/{target.relative_to(newest)}" in out
    assert "resuming from checkpoint_00000002, the newest intact checkpoint" in out

    oldest = optimizer_file(run_dir / "checkpoint_00000002")
    oldest.write_bytes(b"")
    with pytest.raises(CheckpointDamagedError, match="no intact checkpoint to resume from"):
        load_newest_intact(Registered(newest), str(run_dir), {"model": engine}, "causal_lm", {})


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_stops_the_save_and_keeps_the_previous_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, record_property: Any
) -> None:
    engine = engine_for(tiny_model_dir, 2)
    train_step(engine, 0)
    probe = save_at(engine, tmp_path / "probe", 1)
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    with small_tmpfs(tmp_path / "disk", int(size * 1.5)) as disk:  # room for one, not two
        first = save_at(engine, disk, 1)
        expected = weights(engine)
        train_step(engine, 1)
        with pytest.raises(CheckpointWriteError, match="no space left on device") as caught:
            save_at(engine, disk, 2)
        assert "checkpoint of step 2 could not be written" in str(caught.value)
        assert "\n" not in str(caught.value)
        fresh = engine_for(tiny_model_dir, 2)
        assert load_checkpoint(first, {"model": fresh}, "causal_lm") == 1
        for key, value in weights(fresh).items():
            assert torch.equal(value, expected[key]), key
    record_property("disk_full", "one-line error naming the disk; previous checkpoint loads")


def test_rng_states_round_trip_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


class FakeTrainer:
    """Raises the queued errors, one per fit, then returns 'result'."""

    def __init__(self, errors: list[Exception], budgets: list[int], config: Any) -> None:
        self.errors, self.budgets, self.config = errors, budgets, config

    def fit(self) -> str:
        self.budgets.append(self.config.scaling.max_failures)
        if self.errors:
            raise self.errors.pop(0)
        return "result"


def fit_with(errors: list[Exception], max_failures: int) -> tuple[Any, list[int]]:
    config = load_config(PretrainConfig, None, [f"scaling.max_failures={max_failures}"])
    budgets: list[int] = []
    try:
        return fit(config, lambda cfg: FakeTrainer(errors, budgets, cfg)), budgets
    except Exception as error:  # noqa: BLE001 - returned for the assertions
        return error, budgets


def test_a_worker_dying_under_a_controller_call_is_fitted_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ray.exceptions import ActorDiedError
    from ray.train import ControllerError

    def died() -> ControllerError:
        return ControllerError(ActorDiedError())

    result, budgets = fit_with([died(), died()], max_failures=3)
    assert result == "result" and budgets == [3, 2, 1]  # each re-fit spends the budget
    out = capsys.readouterr().out
    assert "fitting again from the newest checkpoint (restart 2/3)" in out

    result, budgets = fit_with([died(), died()], max_failures=1)
    assert isinstance(result, ControllerError) and budgets == [1, 0]

    result, budgets = fit_with([died()], max_failures=-1)
    assert result == "result" and budgets == [-1, -1]

    bug = ControllerError(ValueError("a bug in the controller"))  # not a worker death
    result, budgets = fit_with([bug], max_failures=3)
    assert result is bug and budgets == [3]
