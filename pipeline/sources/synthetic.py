"""The embedded default data set: captioned coloured shapes, rendered deterministically.

One shape per image, random size and position, on a plain light background. Every caption contains
`a {colour} {shape}`, so a trained model can be checked objectively (see `pipeline.adherence`).
"""

from __future__ import annotations

import io
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


@dataclass(frozen=True)
class ShapeSample:
    colour: str
    shape: str
    caption: str
    png: bytes


def caption_for(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def _shape_outline(shape: str, left: float, top: float, size: float) -> list[tuple[float, float]] | tuple:
    if shape == "triangle":
        return [(left + size / 2, top), (left + size, top + size), (left, top + size)]
    return (left, top, left + size, top + size)


def render_shape(
    colour: str, shape: str, *, resolution: int, size: float, left: float, top: float, background: int
) -> Image.Image:
    """Draw one shape; geometry is in image pixels, drawn supersampled and downscaled for clean edges."""
    scale = resolution * SUPERSAMPLE
    canvas = Image.new("RGB", (scale, scale), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    outline = _shape_outline(shape, left * SUPERSAMPLE, top * SUPERSAMPLE, size * SUPERSAMPLE)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(outline, fill=fill)
    elif shape == "square":
        draw.rectangle(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    return canvas.resize((resolution, resolution), Image.Resampling.LANCZOS)


def generate(
    *, count: int, resolution: int, seed: int, min_size: float = 0.4, max_size: float = 0.8
) -> Iterator[ShapeSample]:
    """Yield `count` samples; the same arguments always give the same bytes."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        template = str(rng.choice(CAPTION_TEMPLATES))
        size = float(rng.uniform(min_size, max_size)) * resolution
        left = float(rng.uniform(0, resolution - size))
        top = float(rng.uniform(0, resolution - size))
        background = int(rng.integers(225, 256))
        image = render_shape(
            colour, shape, resolution=resolution, size=size, left=left, top=top, background=background
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        yield ShapeSample(colour, shape, template.format(colour=colour, shape=shape), buffer.getvalue())
