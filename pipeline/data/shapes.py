"""Coloured shapes: the palette, the shapes and captions of the embedded synthetic data set, and their
rendering. The synthetic source, prompt adherence and the monitoring demo batches all draw on these.

One shape per image, random size and position, on a plain light background. Every caption contains
`a {colour} {shape}`, so a trained model can be checked objectively (see `pipeline.evaluation.shape_adherence`).
"""

from __future__ import annotations

import functools
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a {colour} {shape} on a light background",
    "a picture of a {colour} {shape}",
)
SUPERSAMPLE = 4
LIGHT_BACKGROUND = (225, 255)


@dataclass(frozen=True)
class ShapeSample:
    """One render's description; its PNG is drawn when first asked for, so ingest's Ray tasks draw them."""

    colour: str
    shape: str
    caption: str
    fill: tuple[int, int, int]
    resolution: int
    size: float
    left: float
    top: float
    background: int

    @functools.cached_property
    def png(self) -> bytes:
        image = render_shape(self.fill, self.shape, resolution=self.resolution, size=self.size, left=self.left,
                             top=self.top, background=self.background)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        return buffer.getvalue()

    def read(self) -> bytes:
        return self.png


def caption_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


# every colour x shape caption, which the shapes reader (pipeline.evaluation.shape_adherence) can check
SHAPE_PROMPTS = {caption_for(colour, shape): (colour, shape) for colour, shape in itertools.product(COLOURS, SHAPES)}


def _shape_outline(shape: str, left: float, top: float, size: float) -> list[tuple[float, float]] | tuple:
    if shape == "triangle":
        return [(left + size / 2, top), (left + size, top + size), (left, top + size)]
    return (left, top, left + size, top + size)


def render_shape(
    fill: tuple[int, int, int], shape: str, *, resolution: int, size: float, left: float, top: float, background: int
) -> Image.Image:
    """Draw one shape; geometry is in image pixels, drawn supersampled and downscaled for clean edges."""
    scale = resolution * SUPERSAMPLE
    canvas = Image.new("RGB", (scale, scale), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    outline = _shape_outline(shape, left * SUPERSAMPLE, top * SUPERSAMPLE, size * SUPERSAMPLE)
    if shape == "circle":
        draw.ellipse(outline, fill=fill)
    elif shape == "square":
        draw.rectangle(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    return canvas.resize((resolution, resolution), Image.Resampling.LANCZOS)


def render_samples(
    *, count: int, resolution: int, seed: int, min_size: float = 0.4, max_size: float = 0.8,
    colours: dict[str, tuple[int, int, int]] = COLOURS, background: tuple[int, int] = LIGHT_BACKGROUND,
) -> Iterator[ShapeSample]:
    """Yield `count` samples; the same arguments always give the same bytes. `colours` and the grey
    `background` range (low, high inclusive) are there so monitoring demos can shift the distribution."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        colour = str(rng.choice(list(colours)))
        shape = str(rng.choice(SHAPES))
        template = str(rng.choice(CAPTION_TEMPLATES))
        size = float(rng.uniform(min_size, max_size)) * resolution
        left = float(rng.uniform(0, resolution - size))
        top = float(rng.uniform(0, resolution - size))
        grey = int(rng.integers(background[0], background[1] + 1))
        yield ShapeSample(colour, shape, template.format(colour=colour, shape=shape), colours[colour], resolution,
                          size, left, top, grey)
