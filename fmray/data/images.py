"""Captioned images for text-to-image training: the built-in shapes set and image folders,
decoded, resized and tokenized by Ray Data into parquet shards the workers stream.

    fmray diffusion --config jobs/diffusion/tiny.yaml          # trains on the built-in set
    python -c "from fmray.data.images import all_prompts; print(all_prompts()[:3])"

The built-in set ("a red circle on the left") is rendered with PIL from a seed: every image is
one shape of one colour at one of three positions, on black, so a checker can read colour, shape
and position back (fmray.eval.adherence). A folder source holds images plus a captions file
(`metadata.jsonl` / `captions.jsonl` with `file_name` and `text`, or a .parquet with the same
columns), as Hugging Face's imagefolder layout has it.

Each row of the shards: `index` (global, for the strided per-rank reads of fmray.data.pipeline),
`pixels` (H*W*3 uint8, RGB), `input_ids` and `attention_mask` (the caption as the pipeline
encodes it) and `caption`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from fmray import storage
from fmray.config import Section

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": 0.25, "middle": 0.5, "right": 0.75}
BACKGROUND = (0, 0, 0)
ROWS_PER_SHARD = 2048
# Held-out captions recorded with the shards (sample prompts for folder sources).
MAX_LISTED_CAPTIONS = 64
COLUMNS = ("pixels", "input_ids", "attention_mask")


class ImageDataSection(Section):
    source: str = "shapes"
    """'shapes' (built-in captioned shapes) or a folder of images with a captions file."""
    captions: str | None = None
    """Captions file in the folder (default: metadata.jsonl, captions.jsonl, captions.parquet)."""
    image_field: str = "file_name"
    """Column naming each image file, relative to the folder."""
    caption_field: str = "text"
    """Column holding each caption."""
    num_images: int = Field(4096, ge=1)
    """Images rendered for the built-in set."""
    num_eval_images: int = Field(64, ge=1)
    """Held-out images of the built-in set (distinct seed) for the validation loss."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Fraction of a folder's images held out (by file name hash)."""
    resolution: int | None = Field(None, ge=8)
    """Image side in pixels (default: the model's); images are resized and centre-cropped."""
    cache_dir: str | None = None
    """Keep prepared shards here so later runs reuse them (default: <run dir>/data)."""


@dataclass(frozen=True)
class ImageData:
    root: str
    resolution: int
    text_len: int
    num_train_rows: int
    num_eval_rows: int
    eval_captions: list[str]


# ----------------------------------------------------------------------------- built-in set


def caption_of(colour: str, shape: str, position: str) -> str:
    where = "in the middle" if position == "middle" else f"on the {position}"
    return f"a {colour} {shape} {where}"


def caption_words() -> list[str]:
    words = {"a", "in", "the", "on", *COLOURS, *SHAPES, *POSITIONS}
    return sorted(words)


def all_prompts() -> list[tuple[str, dict[str, str]]]:
    """Every caption of the built-in set with its attributes: the fixed evaluation prompts,
    ordered so any prefix is balanced (colour varies fastest, then position, then shape)."""
    colours, positions = list(COLOURS), list(POSITIONS)
    prompts = []
    for shape in SHAPES:
        for position in positions:
            for colour in colours:
                attrs = {"colour": colour, "shape": shape, "position": position}
                prompts.append((caption_of(colour, shape, position), attrs))
    return prompts


def render_shape(
    colour: str, shape: str, position: str, resolution: int, rng: random.Random | None = None
) -> np.ndarray:
    """H x W x 3 uint8: the shape at its position (jittered by `rng` when given), on black."""
    from PIL import Image, ImageDraw

    def jitter(span: float) -> float:
        return rng.uniform(-span, span) if rng is not None else 0.0

    size = resolution * (0.2 + jitter(0.03))  # half-width of the shape
    cx = resolution * POSITIONS[position] + jitter(resolution * 0.03)
    cy = resolution * 0.5 + jitter(resolution * 0.12)
    box = (cx - size, cy - size, cx + size, cy + size)
    image = Image.new("RGB", (resolution, resolution), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - size), (cx - size, cy + size), (cx + size, cy + size)], fill=fill)
    return np.asarray(image, dtype=np.uint8)


def shape_items(num_images: int, seed: int) -> list[dict[str, Any]]:
    """Attributes of `num_images` built-in images: a balanced cycle over colours, shapes and
    positions in a seeded order, and a jitter seed each."""
    combos = [attrs for _, attrs in all_prompts()]
    rng = random.Random(seed)
    items = []
    while len(items) < num_images:
        order = combos[:]
        rng.shuffle(order)
        items += [{**a, "jitter_seed": rng.randrange(2**31)} for a in order]
    return items[:num_images]


def render_batch(batch: dict[str, np.ndarray], resolution: int) -> dict[str, Any]:
    """Ray Data callable: attributes -> pixels and captions."""
    pixels, captions = [], []
    for colour, shape, position, seed in zip(
        batch["colour"], batch["shape"], batch["position"], batch["jitter_seed"], strict=True
    ):
        image = render_shape(
            str(colour), str(shape), str(position), resolution, random.Random(int(seed))
        )
        pixels.append(image.reshape(-1))
        captions.append(caption_of(str(colour), str(shape), str(position)))
    return {
        "pixels": np.stack(pixels),
        "caption": np.array(captions, dtype=object),
        "split": batch["split"],
    }


# ----------------------------------------------------------------------------- folders


def captions_file(folder: str, name: str | None) -> str:
    """The folder's captions file; ValueError naming what was looked for."""
    candidates = [name] if name else ["metadata.jsonl", "captions.jsonl", "captions.parquet"]
    for candidate in candidates:
        location = storage.join(folder, candidate)
        if storage.is_file(location):
            return location
    raise ValueError(f"{folder} holds no captions file (looked for {', '.join(candidates)})")


def load_image(path: str, resolution: int) -> np.ndarray:
    """Decode, resize the short side to `resolution` and centre-crop: H x W x 3 uint8."""
    import io

    from PIL import Image

    fs, inner = storage.filesystem(path)
    with fs.open_input_stream(inner) as stream:
        image = Image.open(io.BytesIO(stream.read())).convert("RGB")
    scale = resolution / min(image.size)
    width, height = (
        max(resolution, round(image.width * scale)),
        max(resolution, round(image.height * scale)),
    )
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8)


def decode_batch(batch: dict[str, np.ndarray], folder: str, resolution: int) -> dict[str, Any]:
    """Ray Data callable: file names -> pixels."""
    pixels = [
        load_image(storage.join(folder, str(name)), resolution).reshape(-1)
        for name in batch["file"]
    ]
    return {"pixels": np.stack(pixels), "caption": batch["caption"], "file": batch["file"]}


def read_folder(data: ImageDataSection, resolution: int) -> Any:
    """A Ray Dataset of (file, caption) rows of a folder's captions file, decoded to pixels."""
    import ray.data

    folder = storage.resolve(data.source)
    location = captions_file(folder, data.captions)
    if location.endswith(".parquet"):
        rows = ray.data.read_parquet(location, columns=[data.image_field, data.caption_field])
    else:
        rows = ray.data.read_json(location, lines=True)
    rows = rows.select_columns([data.image_field, data.caption_field]).rename_columns(
        {data.image_field: "file", data.caption_field: "caption"}
    )
    return rows.map_batches(
        decode_batch, fn_kwargs={"folder": folder, "resolution": resolution}, batch_size=64
    )


# ----------------------------------------------------------------------------- shards


class TokenizeCaptions:
    """Ray Data callable: captions -> padded ids and mask, as the pipeline encodes prompts."""

    def __init__(self, tokenizer_dir: str, text_len: int, space: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.text_len = text_len
        self.space = space

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from fmray.models.diffusion import prepare_caption

        texts = [prepare_caption(self.space, str(c)) for c in batch["caption"]]
        encoded = self.tokenizer(
            texts, padding="max_length", max_length=self.text_len, truncation=True
        )
        return {
            **batch,
            "input_ids": np.asarray(encoded["input_ids"], dtype=np.int32),
            "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int32),
        }


def data_key(data: ImageDataSection, seed: int, resolution: int, tokenizer_dir: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([data.model_dump(exclude={"cache_dir"}), seed, resolution]).encode())
    for path in sorted(Path(tokenizer_dir).iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def split_of(batch: dict[str, Any], i: int, val_fraction: float) -> str:
    """The built-in set names its split; a folder's image is held out by its file name."""
    from fmray.data.split import in_holdout

    if "split" in batch:
        return str(batch["split"][i])
    return "eval" if in_holdout(str(batch["file"][i]), val_fraction) else "train"


def write_rows(
    batches: Any, out_dir: Path, val_fraction: float
) -> tuple[dict[str, int], list[str]]:
    """Write ordered batches into `out_dir`/<split>/ shards with a global index per split;
    returns the row counts and the held-out captions."""
    pending: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    counts = {"train": 0, "eval": 0}
    shards = {"train": 0, "eval": 0}
    eval_captions: list[str] = []

    def flush(split: str) -> None:
        rows = pending[split]
        if not rows:
            return
        table = pa.table(
            {
                "index": np.arange(counts[split], counts[split] + len(rows), dtype=np.int64),
                **{
                    name: pa.FixedSizeListArray.from_arrays(
                        pa.array(np.concatenate([r[name] for r in rows])), len(rows[0][name])
                    )
                    for name in COLUMNS
                },
                "caption": pa.array([r["caption"] for r in rows]),
            }
        )
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out_dir / split / f"shard-{shards[split]:05d}.parquet")
        counts[split] += len(rows)
        shards[split] += 1
        pending[split] = []

    for batch in batches:
        for i in range(len(batch["caption"])):
            row = {name: np.asarray(batch[name][i]) for name in COLUMNS}
            row["caption"] = str(batch["caption"][i])
            split = split_of(batch, i, val_fraction)
            pending[split].append(row)
            if split == "eval":
                eval_captions.append(row["caption"])
            if len(pending[split]) >= ROWS_PER_SHARD:
                flush(split)
    for split in pending:
        flush(split)
    return counts, eval_captions


def build_image_data(
    data: ImageDataSection,
    seed: int,
    resolution: int,
    tokenizer_dir: str,
    text_len: int,
    space: str,
    cache_root: str,
) -> ImageData:
    """Render or decode, resize and tokenize once into `cache_root` (local or remote); later
    runs with the same settings and tokenizer reuse the shards."""
    import ray.data

    from fmray.data.pipeline import iter_in_order, map_on_tokenizer_actor

    root = storage.join(cache_root, data_key(data, seed, resolution, tokenizer_dir))
    done = storage.join(root, "images.json")
    if not storage.is_file(done):
        if data.source == "shapes":
            items = [{**it, "split": "train"} for it in shape_items(data.num_images, seed)]
            items += [{**it, "split": "eval"} for it in shape_items(data.num_eval_images, seed + 1)]
            rows = ray.data.from_items(items).map_batches(
                render_batch, fn_kwargs={"resolution": resolution}, batch_size=256
            )
        else:
            rows = read_folder(data, resolution)
        tokenized = map_on_tokenizer_actor(
            rows,
            TokenizeCaptions,
            fn_constructor_args=(tokenizer_dir, text_len, space),
            batch_size=256,
        )
        staging = storage.staging_dir(root)
        counts, eval_captions = write_rows(iter_in_order(tokenized), staging, data.val_fraction)
        if counts["train"] == 0 or counts["eval"] == 0:
            raise ValueError(
                f"data.source={data.source!r}: {counts['train']} training and {counts['eval']} "
                "held-out images; both need at least one (add images or raise data.val_fraction)"
            )
        meta = {
            "resolution": resolution,
            "text_len": text_len,
            "counts": counts,
            "eval_captions": eval_captions[:MAX_LISTED_CAPTIONS],
        }
        (staging / "images.json").write_text(json.dumps(meta))
        storage.publish_dir(staging, root)
    meta = json.loads(storage.read_text(done))
    return ImageData(
        root=root,
        resolution=meta["resolution"],
        text_len=meta["text_len"],
        num_train_rows=meta["counts"]["train"],
        num_eval_rows=meta["counts"]["eval"],
        eval_captions=meta["eval_captions"],
    )
