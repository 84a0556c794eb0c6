"""Prompt adherence for the synthetic source: does an image show the prompted colour and shape?

A rule-based reader of the rendered world: the background is the median of the border pixels, the
foreground is every pixel far from it; its mean colour names the colour (nearest palette entry) and
its fill ratio inside its bounding box names the shape (square ~1, circle ~pi/4, triangle ~1/2).
It is checked against ground-truth renders in the tests. It applies to the synthetic source only, and
to the evaluation prompts that are colour-and-shape captions ("a red circle").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.shapes import COLOURS, SHAPE_PROMPTS

FOREGROUND_DISTANCE = 60.0
MIN_FOREGROUND_PIXELS = 4
SQUARE_MIN_FILL = 0.88
CIRCLE_MIN_FILL = 0.64


@dataclass(frozen=True)
class Reading:
    colour: str | None
    shape: str | None


def _border_pixels(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def foreground_mask(pixels: np.ndarray) -> np.ndarray:
    background = np.median(_border_pixels(pixels), axis=0)
    return np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float64)
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


def shape_from_mask(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box_area
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    return "triangle"


def read_image(image: Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = foreground_mask(pixels)
    if mask.sum() < MIN_FOREGROUND_PIXELS:
        return Reading(None, None)
    return Reading(nearest_colour(pixels[mask].mean(axis=0)), shape_from_mask(mask))


def adheres(image: Image.Image, colour: str, shape: str) -> tuple[bool, bool]:
    """(colour matches, shape matches) for one generated image."""
    reading = read_image(image)
    return reading.colour == colour, reading.shape == shape


def shape_adherence_metrics(rows: list[list[Image.Image]], prompts: list[str]) -> dict:
    """Colour, shape and both right, over the images of the prompts that are colour-and-shape captions."""
    hits = np.array([
        adheres(image, *SHAPE_PROMPTS[prompt])
        for prompt, images in zip(prompts, rows, strict=True) if prompt in SHAPE_PROMPTS
        for image in images
    ])
    return dict(
        adherence=float(hits.all(axis=1).mean()),
        colour_accuracy=float(hits[:, 0].mean()),
        shape_accuracy=float(hits[:, 1].mean()),
        adherence_samples=len(hits),
    )
