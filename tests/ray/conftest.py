"""One local Ray instance for the whole test session (token auth off for this private cluster)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str):
    """Local Ray with 6 logical CPUs: 2 gloo training workers plus room for data and Serve.

    The local S3 server starts first, so its endpoint and credentials reach every Ray worker.

    The dashboard stays on: Ray Train's placement-group cleaner asks the State API whether the
    controller lives, and without it tears a healthy run down.
    """
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from fmray.distributed.runtime import apply_train_env, worker_env

    apply_train_env(local=True)
    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster another test (or `ray start`) left running
            num_cpus=6,
            runtime_env={"env_vars": worker_env()},
            configure_logging=False,
        )
        # The console as `fmray <command>` shows it (init_ray does the same).
        from fmray.distributed.console import install_console_filter, quiet_driver_loggers

        install_console_filter()
        quiet_driver_loggers()
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def pretrained_base(tiny_tokenizer_dir, tmp_path_factory: pytest.TempPathFactory):
    """A tiny model that knows the synthetic world (plain PyTorch, no Ray)."""
    from tests.ray.chat_models import pretrain_in_process

    return pretrain_in_process(tiny_tokenizer_dir, tmp_path_factory.mktemp("pretrained_base"))


@pytest.fixture(scope="session")
def sft_run(ray_cluster, pretrained_base, tmp_path_factory: pytest.TempPathFactory):
    """One `fmray sft` fit (2 workers, ZeRO-2, 120 steps) of the pretrained base on the built-in
    task: the SFT test checks it; the reward-model, DPO and fault-tier PPO tests start from its
    HF export. Its step-40 checkpoint (`SFT_EARLY_STEP`) stays too: GRPO's and PPO's tests start
    from that short SFT."""
    from fmray.train import sft
    from tests.ray.chat_models import SFT_EARLY_STEP, sft_config

    out = tmp_path_factory.mktemp("sft_run")
    checkpoint = {"every_steps": SFT_EARLY_STEP, "keep_last": 3}
    return sft.run(sft_config(pretrained_base, out, train={"eval_every": 0}, checkpoint=checkpoint))


@pytest.fixture(scope="session")
def reward_run(sft_run, tmp_path_factory: pytest.TempPathFactory):
    """One `fmray reward` fit (2 workers, ZeRO-3, 80 steps) from the SFT model: the reward-model
    test checks it; PPO's tests score with it (the fault-tier one starts its critic from it)."""
    from pathlib import Path

    from fmray.config import validate_config
    from fmray.train import reward
    from tests.ray.chat_models import align_tree

    out = tmp_path_factory.mktemp("reward_run")
    sft_model = Path(sft_run.checkpoint.path) / "hf"
    tree = align_tree(sft_model, out, "rm", train={"max_steps": 80, "lr": 3e-4})
    return reward.run(validate_config(reward.RewardConfig, tree))


DIFFUSION_PIXEL_STEPS = 300


@pytest.fixture(scope="session")
def diffusion_pixel_run(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    """One `fmray diffusion` fit of the tiny pixel preset (2 workers, 300 steps) on the built-in
    shapes: test_diffusion checks its adherence and export; test_serve_images serves it.
    Returns the Ray Train result with `run_dir` (the fmray run folder) set on it."""
    from fmray.config import load_config
    from fmray.train.diffusion import DiffusionConfig, run

    out = tmp_path_factory.mktemp("diffusion_pixel")
    overrides = [
        "run.name=pixel",
        f"run.output_dir={out / 'runs'}",
        "model.preset=tiny",
        "model.train_text_encoder=true",
        "data.num_images=1024",
        "data.num_eval_images=32",
        "diffusion.ema_decay=0.99",
        "sample.num_adherence_prompts=36",
        "sample.steps=10",
        "sample.sampler=dpm",
        "train.micro_batch_size=8",
        f"train.max_steps={DIFFUSION_PIXEL_STEPS}",
        "train.lr=2e-3",
        "train.warmup_steps=20",
        "train.log_every=10",
        "train.eval_every=0",
        "train.eval_batches=1",
        "zero.stage=0",
        "scaling.num_workers=2",
    ]
    result = run(load_config(DiffusionConfig, None, overrides))
    assert result.error is None
    result.run_dir = out / "runs" / "pixel"
    return result
