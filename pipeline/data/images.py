"""Images as the data stages see them: a sample's id and header facts (ingest, monitoring), and the
conversion to 8-bit RGB at a size that preprocess applies and monitoring repeats on new batches."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from pipeline.quality.image_checks import INTEGER_MODES, integer_to_grey, read_header

WHITE = (255, 255, 255)
CENTRE = (0.5, 0.5)


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_image(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) read from the header only; no pixels are decoded here.

    Pillow's decompression-bomb guard is off for the header: the size is recorded, and validation refuses
    images above `validate.max_pixels` before anything decodes them.
    """
    width, height, image_format, _ = read_header(io.BytesIO(data))
    return width, height, image_format


def onto_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, WHITE)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def to_rgb(image: Image.Image) -> Image.Image:
    """Respect EXIF orientation, composite transparency onto white, and return 8-bit RGB.

    Handles 1, L, P (with or without transparency), LA, PA, RGBA, CMYK and 16/32-bit integer images.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in INTEGER_MODES:
        image = integer_to_grey(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return onto_white(image)
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: tuple[int, int], centering: tuple[float, float] = CENTRE) -> Image.Image:
    """Scale the image to cover `size` (width, height), then crop that at `centering` (the centre by default)."""
    return ImageOps.fit(image, size, Image.Resampling.LANCZOS, centering=centering)


def load_training_image(source: Path | BinaryIO, resolution: int, centering: tuple[float, float] = CENTRE) -> Image.Image:
    """The image (a file, or its bytes) as a square at `resolution`, converted as preprocess converts
    (monitoring reads batches so)."""
    with Image.open(source) as image:
        return resize_and_crop(to_rgb(image), (resolution, resolution), centering)
