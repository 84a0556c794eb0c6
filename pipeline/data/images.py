"""Images as the data stages see them: decoding under a pixel limit, a sample's id and header facts
(ingest, monitoring), and the conversion to 8-bit RGB at a size that preprocess applies and monitoring
repeats on new batches. Validation measures through the same conversion (`to_rgb`), so what it checks is
what gets trained on."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
CENTRE = (0.5, 0.5)
GRID_ZOOM = 4  # sample grids of 32 px images are looked at by people: nearest-neighbour x4
INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16- and 32-bit integer pixels
ORIENTATION, TURNED_ORIENTATIONS = 0x0112, (5, 6, 7, 8)  # the EXIF tag, and its values that swap width and height
ImageSource = Path | bytes | None  # a file, an image's bytes (from a shard), or nothing found


@contextmanager
def pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's own bomb guard, set for the duration: None while reading headers (our limit decides)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_header(source) -> tuple[int, int, str, str]:
    """(width, height, format, mode) of a path or file object; no pixels are decoded."""
    with pixel_limit(None), Image.open(source) as image:
        return image.width, image.height, (image.format or "unknown").lower(), image.mode


def integer_to_grey(image: Image.Image) -> Image.Image:
    """8-bit grey from Pillow's integer modes, scaled rather than clipped (convert() clips at 255).

    Values within 0..65535 (every I;16* image, and 16-bit files Pillow decodes as I) are divided by 257
    and rounded, so 65535 -> 255; anything outside the 16-bit range is stretched from its own minimum to
    its maximum. Validation measures and preprocessing converts through this one function, so the
    brightness validate checks is the brightness that gets trained on. A change here changes processed
    images: bump preprocess.CONVERSION_VERSION with it.
    """
    values = np.asarray(image).astype(np.float64)
    low, high = values.min(), values.max()
    if low >= 0 and high <= 0xFFFF:
        low, high = 0.0, float(0xFFFF)
    scaled = (values - low) * 255.0 / max(high - low, 1.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def opened(source: ImageSource) -> Path | io.BytesIO:
    """What Image.open reads: the file, or the bytes (an image kept in a shard)."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


def content_id(data: bytes, mask: bytes | None = None) -> str:
    """A sample's id: the hash of its bytes, and of its mask file's where it has one (a new mask, a new sample)."""
    digest = hashlib.sha256(data)
    if mask is not None:
        digest.update(b"\0mask\0" + mask)
    return digest.hexdigest()


def upright_size(data: bytes) -> tuple[int, int]:
    """(width, height) as the image is shown, after its EXIF orientation; from the header only."""
    with pixel_limit(None), Image.open(io.BytesIO(data)) as image:
        turned = image.getexif().get(ORIENTATION) in TURNED_ORIENTATIONS
        return (image.height, image.width) if turned else (image.width, image.height)


def mask_problem(image: bytes, mask: bytes, mask_name: str) -> str:
    """Why a mask file cannot be its image's mask, or '' when it can: it opens, and is as large as the image
    (both as shown, after their EXIF orientation)."""
    try:
        mask_size = upright_size(mask)
    except (OSError, ValueError) as exc:
        return f"its mask file {mask_name} is not an image Pillow can open ({type(exc).__name__})"
    image_size = upright_size(image)
    if mask_size != image_size:
        return (f"its mask file {mask_name} is {mask_size[0]}x{mask_size[1]} pixels but the image is "
                f"{image_size[0]}x{image_size[1]}")
    return ""


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


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """The upright image's alpha channel as an 8-bit grey mask (255: the subject), or None where it has no
    transparency (integer images have none). preprocess crops it exactly as to_rgb's image."""
    image = ImageOps.exif_transpose(image)
    if image.mode in INTEGER_MODES or not has_transparency(image):
        return None
    return image.convert("RGBA").getchannel("A")


def file_mask(data: bytes) -> Image.Image:
    """A mask file as an 8-bit grey mask (255: the subject), upright: a colour mask counts by its brightness and
    one with transparency by its alpha times its brightness (a transparent pixel is ignored)."""
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)
        grey = integer_to_grey(image) if image.mode in INTEGER_MODES else image.convert("L")
        if image.mode in INTEGER_MODES or not has_transparency(image):
            return grey
        alpha = np.asarray(image.convert("RGBA").getchannel("A"), dtype=np.uint16)
        return Image.fromarray((np.asarray(grey, dtype=np.uint16) * alpha // 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Respect EXIF orientation, composite transparency onto white, and return 8-bit RGB.

    Handles 1, L, P (with or without transparency), LA, PA, RGBA, CMYK and 16/32-bit integer images.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in INTEGER_MODES:
        image = integer_to_grey(image)
    if has_transparency(image):
        return onto_white(image)
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: tuple[int, int], centering: tuple[float, float] = CENTRE) -> Image.Image:
    """Scale the image to cover `size` (width, height), then crop that at `centering` (the centre by default)."""
    return ImageOps.fit(image, size, Image.Resampling.LANCZOS, centering=centering)


def crop_top_left(original: tuple[int, int], size: tuple[int, int], centering: tuple[float, float]) -> tuple[int, int]:
    """Where resize_and_crop's crop of an image of `original` (width, height) starts, as (left, top) in the
    pixels of the scaled image: ImageOps.fit's crop box, scaled. SDXL conditions on it (its "crop coords")."""
    ratio = size[0] / size[1]
    if original[0] / original[1] >= ratio:
        crop_width, crop_height = ratio * original[1], original[1]
    else:
        crop_width, crop_height = original[0], original[0] / ratio
    scale = size[0] / crop_width
    return (round((original[0] - crop_width) * centering[0] * scale),
            round((original[1] - crop_height) * centering[1] * scale))


def load_training_image(source: Path | BinaryIO, resolution: int, centering: tuple[float, float] = CENTRE) -> Image.Image:
    """The image (a file, or its bytes) as a square at `resolution`, converted as preprocess converts
    (monitoring reads batches so)."""
    with Image.open(source) as image:
        return resize_and_crop(to_rgb(image), (resolution, resolution), centering)


def image_grid(rows: list[list[Image.Image]], zoom: int = GRID_ZOOM) -> Image.Image:
    """Rows of equal-sized images pasted into one picture and enlarged (training and evaluation sample grids)."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            grid.paste(image, (column * width, row * height))
    return grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)
