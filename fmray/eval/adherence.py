"""Prompt adherence of generated images on the built-in shapes set: a deterministic checker
reads an image's dominant colour, its shape and its position and compares them with the prompt.

    fmray diffusion --config jobs/diffusion/tiny.yaml    # colour_acc, shape_acc, position_acc

- foreground: the largest blob of pixels far from the black background (brightest channel above
  a threshold after a 3x3 mean, so stray speckles of a generated background do not count);
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
    brightness = pixels.max(axis=-1).astype(np.float64)
    # The object is the largest blob of the smoothed brightness (stray speckles of a generated
    # image's background fade under the 3x3 mean); its pixels are the bright ones inside it.
    blob = largest_component(box_mean(brightness) > FOREGROUND_LEVEL)
    mask = blob & (brightness > FOREGROUND_LEVEL)
    if mask.mean() < MIN_FOREGROUND:
        return None
    ys, xs = np.nonzero(mask)
    colour = nearest_colour(np.median(pixels[mask].astype(np.float64), axis=0))
    centre = xs.mean() / pixels.shape[1]
    position = "left" if centre < 1 / 3 else "right" if centre > 2 / 3 else "middle"
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box_area
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    return {"colour": colour, "shape": shape, "position": position}


def box_mean(values: np.ndarray) -> np.ndarray:
    """3x3 mean (edges repeated)."""
    padded = np.pad(values, 1, mode="edge")
    height, width = values.shape
    windows = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    return np.mean(windows, axis=0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask` (all False when it is empty)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, height, width = 0, 0, *mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label = int(labels.max()) + 1
        labels[start] = label
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros(mask.shape, dtype=bool)


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
