"""Text-to-image pieces without Ray: the built-in images and their checker, the caption
tokenizer, configs and presets, the loss against its closed form, and the diffusion checkpoint
(live export, samples, offline export) with a single-process DeepSpeed engine."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fmray.config import ConfigError, TrainSection, ZeroSection, load_config
from fmray.data.images import COLOURS, all_prompts, render_shape, shape_items
from fmray.eval.adherence import adherence, read_image
from fmray.train.diffusion import DiffusionConfig, check_inputs, min_snr_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_checker_reads_every_rendered_image_correctly() -> None:
    items = shape_items(324, seed=3)
    images = [
        render_shape(i["colour"], i["shape"], i["position"], 32, random.Random(i["jitter_seed"]))
        for i in items
    ]
    assert adherence(images, items) == {"colour_acc": 1.0, "shape_acc": 1.0, "position_acc": 1.0}
    assert read_image(np.zeros((32, 32, 3), dtype=np.uint8)) is None
    # Floats in [0, 1] (what pipelines return) read the same as uint8.
    assert read_image(images[0] / 255.0) == read_image(images[0])


def test_checker_reads_rounded_squares_and_ellipses() -> None:
    """Generated squares come out with rounded corners (their fill ratio is a circle's), and
    generated circles a little stretched: the corners of the bounding box tell them apart."""
    from PIL import Image, ImageDraw

    def drawn(shape: str, box: tuple[int, int, int, int], radius: int = 0) -> np.ndarray:
        image = Image.new("RGB", (32, 32))
        draw = ImageDraw.Draw(image)
        if shape == "square":
            draw.rounded_rectangle(box, radius=radius, fill=COLOURS["green"])
        else:
            draw.ellipse(box, fill=COLOURS["green"])
        return np.asarray(image)

    for radius in (2, 3, 4):
        assert read_image(drawn("square", (2, 9, 15, 22), radius))["shape"] == "square"
    for box in ((2, 9, 15, 22), (1, 9, 16, 22), (17, 7, 30, 24)):
        assert read_image(drawn("circle", box))["shape"] == "circle"


def test_built_in_set_is_balanced_and_deterministic() -> None:
    items = shape_items(108, seed=0)
    assert items == shape_items(108, seed=0) and items != shape_items(108, seed=1)
    for key, values in (("colour", COLOURS), ("shape", ("circle", "square", "triangle"))):
        counts = {v: sum(i[key] == v for i in items) for v in values}
        assert len(set(counts.values())) == 1, counts
    prompts = all_prompts()
    assert len(prompts) == 54 and prompts[0][0] == "a red circle on the left"
    assert {attrs["colour"] for _, attrs in prompts[: len(COLOURS)]} == set(COLOURS)


def test_caption_tokenizer_spells_caption_words_as_single_tokens() -> None:
    from fmray.data.images import caption_words
    from fmray.models.diffusion import caption_tokenizer

    tokenizer = caption_tokenizer(caption_words())
    ids = tokenizer("a purple triangle in the middle")["input_ids"]
    assert len(ids) == 2 + 6  # start, six words, end
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a purple triangle in the middle"
    # Other text falls back to byte characters: nothing is unknown.
    assert tokenizer.unk_token_id not in tokenizer("zebra!")["input_ids"][1:-1]


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "jobs" / "diffusion").glob("*.yaml")))
def test_presets_validate(path: Path) -> None:
    config = load_config(DiffusionConfig, path)
    assert config.zero.stage in (0, 1, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("zero.stage=3", "zero.stage=3 is not supported by diffusion"),
        ("model.preset=huge", "model.preset='huge' is unknown"),
        ("model.prediction_type=x0", "model.prediction_type='x0'"),
        ("diffusion.caption_dropout=1.5", "diffusion.caption_dropout=1.5"),
        ("sample.sampler=euler", "sample.sampler='euler'"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DiffusionConfig, REPO_ROOT / "jobs" / "diffusion" / "tiny.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_inputs_fail_before_ray(tmp_path: Path) -> None:
    for override, message in (
        (f"model.path={tmp_path}", "is not a diffusers pipeline directory"),
        (f"data.source={tmp_path / 'none'}", "no such folder"),
        (f"data.source={tmp_path}", "holds no captions file"),
    ):
        config = load_config(DiffusionConfig, None, [override, f"run.output_dir={tmp_path}"])
        with pytest.raises(ConfigError, match=message):
            check_inputs(config)


def test_min_snr_weights_match_the_closed_form() -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 10, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(min_snr_weights(scheduler, t, 5.0), expected)
    scheduler.register_to_config(prediction_type="v_prediction")
    expected_v = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    assert torch.allclose(min_snr_weights(scheduler, t, 5.0), expected_v)


def test_noisiest_fraction_draws_that_share_from_the_top_of_the_schedule() -> None:
    from fmray.train.diffusion import DiffusionSection, draw_timesteps

    uniform = draw_timesteps(1000, 8, None, torch.Generator().manual_seed(0))
    assert torch.equal(
        uniform, torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0))
    )
    assert torch.equal(
        draw_timesteps(1000, 8, DiffusionSection(), torch.Generator().manual_seed(0)), uniform
    )
    diff = DiffusionSection(noisiest_fraction=0.5, noisiest_span=0.01)
    drawn = draw_timesteps(1000, 20_000, diff, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, draw_timesteps(1000, 20_000, diff, torch.Generator().manual_seed(0)))
    top = (drawn >= 990).float().mean().item()
    assert abs(top - (0.5 + 0.5 * 0.01)) < 0.02, top  # the drawn half plus uniform's 1%
    assert drawn.min() >= 0 and drawn.max() <= 999 and (drawn < 500).float().mean() > 0.2


# ----------------------------------------------------------------------------- checkpoint


def rows_of(parts: Any, count: int) -> dict[str, torch.Tensor]:
    from fmray.models.diffusion import text_length

    items = shape_items(count, seed=0)
    pixels = [
        render_shape(i["colour"], i["shape"], i["position"], 32, random.Random(i["jitter_seed"]))
        for i in items
    ]
    captions = [f"a {i['colour']} {i['shape']}" for i in items]
    encoded = parts.tokenizer(
        captions, padding="max_length", max_length=text_length(parts), return_tensors="pt"
    )
    return {
        "pixels": torch.from_numpy(np.stack(pixels).reshape(count, -1)).long(),
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
    }


@pytest.mark.parametrize(
    ("preset", "sampler", "lora"),
    [("tiny", "ddim", False), ("tiny-latent", "dpm", True)],
)
def test_checkpoint_exports_a_pipeline_that_reproduces_the_samples(
    preset: str, sampler: str, lora: bool, single_process_group: None, tmp_path: Path
) -> None:
    """Two ZeRO-2 steps with EMA, a checkpoint without weights in its pipeline (export_hf off:
    frozen parts come from the base model), the offline export: stock diffusers loads it and
    reproduces the in-training samples for the same seeds. With LoRA only the adapters train
    and save; the export merges them into a plain UNet."""
    from diffusers import DiffusionPipeline

    from fmray.checkpoint import export_checkpoint, save_checkpoint
    from fmray.checkpoint.diffusion import LiveExport, write_samples
    from fmray.distributed.deepspeed_setup import build_ds_config
    from fmray.models.diffusion import (
        LORA_TARGETS,
        Denoiser,
        add_unet_lora,
        build_preset,
        generate,
        load_parts,
    )
    from fmray.train.diffusion import EMA, diffusion_loss
    from fmray.train.worker import build_train_engine

    torch.manual_seed(0)
    base = build_preset(preset, tmp_path / "base")
    parts = load_parts(base, None)
    if lora:
        add_unet_lora(parts.unet, 4, 8.0, LORA_TARGETS)
    train_text = preset == "tiny"
    denoiser = Denoiser(parts.space, parts.unet, parts.text_encoder if train_text else None)
    parts.text_encoder.requires_grad_(train_text)
    train = TrainSection(micro_batch_size=4, lr=1e-2, warmup_steps=0, max_steps=10)
    engine = build_train_engine(
        denoiser, build_ds_config(train, ZeroSection(stage=2), 1, False), train
    )
    ema = EMA(engine.module, 0.9)
    batch = rows_of(parts, 4)
    for step in range(2):
        loss = diffusion_loss(engine, parts, batch, 32, None, train_text, torch.device("cpu"))
        engine.backward(loss)
        engine.step()
        ema.update(engine.module, step + 1)
    assert torch.isfinite(loss)

    prompts = ["a red circle on the left", "a blue square in the middle"]
    live = LiveExport(parts, ema, sampler, prompts, seed=5, steps=3, guidance_scale=3.0)
    ckpt = tmp_path / "ckpt"
    meta = {"run": "unit", "base_model": str(base), "export_module": "denoiser"}
    from fmray.checkpoint.exporters import exporter_for

    exporter_for("diffusion").write_live(engine, ckpt, live, meta, False)
    config_yaml = "lora: {r: 4, alpha: 8.0, target_modules: [to_q, to_k, to_v, to_out.0]}\n"
    save_checkpoint(ckpt, 2, {"denoiser": engine}, "diffusion", config_yaml if lora else "", meta)
    if lora:  # only the adapters were saved
        assert all("lora" in name for name in ema.state_dict())
    assert (ckpt / "samples.png").is_file() and not list((ckpt / "pipeline").rglob("*.safetensors"))
    settings = json.loads((ckpt / "samples.json").read_text())
    assert settings["prompts"] == prompts and settings["seed"] == 5

    out = export_checkpoint(str(ckpt), tmp_path / "export")
    pipeline = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipeline).__name__ == (
        "IFPipeline" if preset == "tiny" else "StableDiffusionPipeline"
    )
    expected = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}[sampler]
    assert type(pipeline.scheduler).__name__ == expected
    exported = pipeline.unet.state_dict()
    assert not any("lora" in name for name in exported)
    if lora:  # merged: the attention projections moved away from the base model's
        from diffusers import UNet2DConditionModel

        base_unet = UNet2DConditionModel.from_pretrained(str(base / "unet")).state_dict()
        moved = [k for k in exported if "to_q" in k and not torch.equal(exported[k], base_unet[k])]
        assert moved and all(
            torch.equal(exported[k], base_unet[k]) for k in exported if "conv" in k
        )
    for name, value in ema.state_dict().items():
        if name.startswith("unet.") and not lora:
            assert torch.equal(exported[name.removeprefix("unet.")], value), name
    images = generate(pipeline, prompts, [5, 6], 3, 3.0)
    np.testing.assert_allclose(images, np.load(ckpt / "samples.npy"), atol=1e-5)
    # The grid writer tiles what it is given.
    write_samples(tmp_path, images, live)
    assert (tmp_path / "samples.png").is_file()


def test_folder_images_are_resized_and_centre_cropped(tmp_path: Path) -> None:
    from PIL import Image

    from fmray.data.images import captions_file, decode_batch

    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, 20:60] = (200, 30, 30)  # the centre square of a 2:1 image
    Image.fromarray(wide).save(tmp_path / "wide.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "wide.png", "text": "red"}\n')
    assert captions_file(str(tmp_path), None).endswith("metadata.jsonl")
    batch = {"file": np.array(["wide.png"]), "caption": np.array(["red"])}
    pixels = decode_batch(batch, str(tmp_path), 16)["pixels"].reshape(16, 16, 3)
    assert pixels.shape == (16, 16, 3)
    assert abs(int(pixels[8, 8, 0]) - 200) <= 2 and abs(int(pixels[8, 1, 0]) - 200) <= 40
