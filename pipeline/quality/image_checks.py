"""Per-image properties the validation suite checks but Great Expectations cannot compute itself.

Each image is read once: its header first, and its pixels only when the header's pixel count is within
`validate.max_pixels`, so a decompression bomb (a small file declaring 40000×40000) is never decoded.
The decoded pixels give a 64-bit difference hash (dHash: near-duplicates are a few bits apart, and
pipeline.quality.near_duplicates finds them), the grey-level mean that finds extreme exposures and the
colour spread that finds blank images. Decoding is preprocess's own (`to_rgb`: upright, transparency onto white),
so a cut-out is measured as it is trained on, not by the colours under its transparent pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.images import ImageSource, opened, pixel_limit, read_header, to_rgb

HASH_SIDE = 8  # 8×8 comparisons: a 64-bit hash
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


def difference_hash(grey: Image.Image) -> int:
    """64-bit dHash: is each pixel of a 9×8 thumbnail brighter than its right neighbour."""
    small = np.asarray(grey.resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(sum(1 << index for index, bit in enumerate(bits) if bit))


def measure(source: ImageSource, max_pixels: int, hash_min_side: int) -> ImageProperties:
    """The properties of one image: a file, or its bytes; None for one that could not be found."""
    unreadable = dict(decodable=False, image_format=None, mode=None, pixels=None, dhash=None, brightness=None,
                      contrast=None)
    if source is None:
        return ImageProperties(**unreadable, problem="image not found in its shard")
    if isinstance(source, Path) and not source.is_file():
        return ImageProperties(**unreadable, problem=f"file not found: {source.name}")
    try:
        width, height, image_format, mode = read_header(opened(source))
    except Exception as error:  # any header Pillow refuses: nothing to decode
        return ImageProperties(**unreadable, problem=f"no image header Pillow can read ({type(error).__name__})")
    header = dict(image_format=image_format, mode=mode, pixels=width * height)
    if width * height > max_pixels:
        return ImageProperties(decodable=None, problem="not decoded", dhash=None, brightness=None, contrast=None,
                               **header)
    try:
        with pixel_limit(max_pixels), Image.open(opened(source)) as image:
            small = to_rgb(image)  # decodes every pixel: truncated and corrupt data fail here
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


def property_columns(sources: list[ImageSource], max_pixels: int, hash_min_side: int) -> dict[str, list]:
    """The properties of every image, as columns for the frame the suite validates."""
    measured = [asdict(measure(source, max_pixels, hash_min_side)) for source in sources]
    return {name: [row[name] for row in measured] for name in ImageProperties.__dataclass_fields__}


