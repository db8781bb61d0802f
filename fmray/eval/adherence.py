"""Prompt adherence of generated images on the built-in shapes set: a deterministic checker
reads an image's dominant colour, its shape and its position and compares them with the prompt.

    fmray diffusion --config jobs/diffusion/tiny.yaml    # colour_acc, shape_acc, position_acc

- foreground: pixels far from the black background (the brightest channel above a threshold);
- colour: the palette colour nearest to the foreground's median RGB;
- position: the foreground centroid's horizontal third (left / middle / right);
- shape: how much of its bounding box the foreground fills (square ~1, circle ~pi/4,
  triangle ~1/2).
An image with (almost) no foreground reads as nothing and fails all three checks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmray.data.images import COLOURS

FOREGROUND_LEVEL = 60
MIN_FOREGROUND = 0.01
# Fill ratio of the bounding box: above SQUARE_FILL a square, above CIRCLE_FILL a circle.
SQUARE_FILL = 0.88
CIRCLE_FILL = 0.66


def read_image(image: np.ndarray) -> dict[str, str] | None:
    """Colour, shape and position of an H x W x 3 image (uint8, or floats in [0, 1])."""
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)
    mask = pixels.max(axis=-1) > FOREGROUND_LEVEL
    if mask.mean() < MIN_FOREGROUND:
        return None
    ys, xs = np.nonzero(mask)
    colour = nearest_colour(np.median(pixels[mask].astype(np.float64), axis=0))
    width = pixels.shape[1]
    centre = xs.mean() / width
    position = "left" if centre < 1 / 3 else "right" if centre > 2 / 3 else "middle"
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box_area
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    return {"colour": colour, "shape": shape, "position": position}


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def adherence_counts(images: Any, expected: list[dict[str, str]]) -> np.ndarray:
    """Correct colours, shapes and positions over `images` (in order of `expected`)."""
    counts = np.zeros(3, dtype=np.float64)
    for image, want in zip(images, expected, strict=True):
        got = read_image(image)
        if got is None:
            continue
        counts += [got[key] == want[key] for key in ("colour", "shape", "position")]
    return counts


def adherence(images: Any, expected: list[dict[str, str]]) -> dict[str, float]:
    """Colour, shape and position accuracy over `images`."""
    counts = adherence_counts(images, expected) / max(1, len(expected))
    return dict(zip(("colour_acc", "shape_acc", "position_acc"), counts.tolist(), strict=True))
