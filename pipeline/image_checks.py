"""Per-image properties the validation suite checks but Great Expectations cannot compute itself.

Each image is read once: its header first, and its pixels only when the header's pixel count is within
`validate.max_pixels`, so a decompression bomb (a small file declaring 40000×40000) is never decoded.
The decoded pixels give a 64-bit difference hash (dHash: near-duplicates are a few bits apart), the
grey-level mean that finds extreme exposures and the colour spread that finds blank images.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HASH_SIDE = 8  # 8×8 comparisons: a 64-bit hash
INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16- and 32-bit integer pixels
STATS_SIDE = 64  # brightness statistics on at most 64×64 px: enough to tell blank from not, and cheap


@dataclass(frozen=True)
class ImageProperties:
    """None where a property could not be measured: Great Expectations skips nulls, so a file that is not
    decoded fails only the check that says why."""

    decodable: bool | None  # None: not decoded on purpose (too many pixels, or no header at all)
    problem: str | None  # why the file could not be read or decoded
    image_format: str | None
    mode: str | None
    pixels: int | None
    dhash: int | None
    brightness: float | None  # mean grey level, 0-255
    contrast: float | None  # largest standard deviation of a colour channel: ~0 for a blank image


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


def difference_hash(grey: Image.Image) -> int:
    """64-bit dHash: is each pixel of a 9×8 thumbnail brighter than its right neighbour."""
    small = np.asarray(grey.resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(sum(1 << index for index, bit in enumerate(bits) if bit))


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


def eight_bit(image: Image.Image) -> Image.Image:
    """8-bit RGB, or grey for integer images, scaled down where Pillow's `convert` would clip them to white."""
    if image.mode in INTEGER_MODES:
        return integer_to_grey(image)
    return image.convert("RGB")


def measure(path: Path, max_pixels: int, hash_min_side: int) -> ImageProperties:
    unreadable = dict(decodable=False, image_format=None, mode=None, pixels=None, dhash=None, brightness=None,
                      contrast=None)
    if not path.is_file():
        return ImageProperties(**unreadable, problem=f"file not found: {path.name}")
    try:
        width, height, image_format, mode = read_header(path)
    except Exception as error:  # any header Pillow refuses: nothing to decode
        return ImageProperties(**unreadable, problem=f"no image header Pillow can read ({type(error).__name__})")
    header = dict(image_format=image_format, mode=mode, pixels=width * height)
    if width * height > max_pixels:
        return ImageProperties(decodable=None, problem="not decoded", dhash=None, brightness=None, contrast=None,
                               **header)
    try:
        with pixel_limit(max_pixels), Image.open(path) as image:
            small = eight_bit(image)  # decodes every pixel: truncated and corrupt data fail here
    except Exception as error:  # any decoder error means the file cannot be trained on
        return ImageProperties(decodable=False, problem=decode_problem(error), dhash=None, brightness=None,
                               contrast=None, **header)
    small.thumbnail((STATS_SIDE, STATS_SIDE), Image.Resampling.BOX)
    grey = small.convert("L")
    channels = np.asarray(small, dtype=np.float64).reshape(-1, len(small.getbands()))
    # Below hash_min_side a re-encode moves a dHash as far as a different picture does (measured on 32 px
    # shapes: JPEG q85 flips 4-11 bits, while distinct shapes of one colour often differ by 0-1).
    dhash = difference_hash(grey) if min(width, height) >= hash_min_side else None
    return ImageProperties(decodable=True, problem=None, dhash=dhash,
                           brightness=float(np.asarray(grey).mean()),
                           # per channel: a blue shape on a dark grey ground has colour but little grey contrast
                           contrast=float(channels.std(axis=0).max()), **header)


def decode_problem(error: Exception) -> str:
    message = str(error).strip() or "no message"
    return f"{type(error).__name__}: {message}"


def property_columns(paths: list[Path], max_pixels: int, hash_min_side: int) -> dict[str, list]:
    """The properties of every image, as columns for the frame the suite validates."""
    measured = [asdict(measure(path, max_pixels, hash_min_side)) for path in paths]
    return {name: [row[name] for row in measured] for name in ImageProperties.__dataclass_fields__}


def near_duplicate_of(hashes: list[int | None], labels: list[str], max_distance: int) -> list[str | None]:
    """For each image, the label of an earlier image whose dHash is at most `max_distance` bits away.

    The first of a group keeps None, so it stays. All pairs are compared (n²/2 popcounts in numpy, about a
    second for 10,000 images); a few hundred thousand images would want a banded index instead.
    """
    known = [index for index, value in enumerate(hashes) if value is not None]
    found: list[str | None] = [None] * len(hashes)
    if not known:
        return found
    values = np.array([hashes[index] for index in known], dtype=np.uint64)
    for position, index in enumerate(known[1:], start=1):
        distances = np.bitwise_count(values[:position] ^ values[position])
        close = np.flatnonzero(distances <= max_distance)
        if close.size:
            first = known[int(close[0])]
            found[index] = f"{labels[first]} ({int(distances[close[0]])} bits apart)"
    return found
