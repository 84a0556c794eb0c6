"""Per-image properties the validation suite checks but Great Expectations cannot compute itself.

Each image is read once: its header first, and its pixels only when the header's pixel count is within
`validate.max_pixels`, so a decompression bomb (a small file declaring 40000×40000) is never decoded.
The decoded pixels give a 64-bit difference hash (dHash: near-duplicates are a few bits apart), the
grey-level mean that finds extreme exposures and the colour spread that finds blank images.

Near-duplicates are found in two steps. Candidates: pairs of dHashes within a few bits, from a
multi-index over blocks of the hash (no all-pairs scan). Confirmation: the two images are read again and
compared in colour on a 24×24 grid, allowing for re-encoding, resizing and a small crop; only a pair that
also looks alike there is a near-duplicate. The grey hash alone cannot tell a red circle from a green one
of the same brightness, or a picture from one with a small object added.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HASH_SIDE = 8  # 8×8 comparisons: a 64-bit hash
INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16- and 32-bit integer pixels
STATS_SIDE = 64  # brightness statistics on at most 64×64 px: enough to tell blank from not, and cheap
COMPARE_SIDE = 24  # the colour grid near-duplicate candidates are confirmed on
# Crops tried when confirming a candidate: 0, 1 or 2 of 64 px off each edge (a crop of up to ~3 % per edge).
CROP_STEPS = (0.0, 1 / 64, 2 / 64)
THUMBNAILS_KEPT = 4096  # ~12 KB each: the images of many candidate pairs are read once, within ~50 MB
MAX_BLOCK_NEIGHBOURS = 100_000  # a multi-index layout that would look up more values per hash is not tried

ImageSource = Path | bytes | None  # a file, an image's bytes (from a shard), or nothing found


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


def opened(source: ImageSource) -> Path | io.BytesIO:
    """What Image.open reads: the file, or the bytes (an image kept in a shard)."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


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


def property_columns(sources: list[ImageSource], max_pixels: int, hash_min_side: int) -> dict[str, list]:
    """The properties of every image, as columns for the frame the suite validates."""
    measured = [asdict(measure(source, max_pixels, hash_min_side)) for source in sources]
    return {name: [row[name] for row in measured] for name in ImageProperties.__dataclass_fields__}


def block_layout(count: int, max_distance: int) -> tuple[list[int], int]:
    """The block widths the 64 bits are cut into, and how many bits a block may differ by (r), chosen to
    look up the fewest values: two hashes within k bits differ by at most r = ceil((k+1)/m) - 1 bits in at
    least one of m blocks (if every block differed by r+1 or more, they would differ by m(r+1) > k bits)."""
    best = None
    for blocks in range(1, min(max_distance + 1, 64) + 1):
        widths = [64 // blocks + (index < 64 % blocks) for index in range(blocks)]
        radius = math.ceil((max_distance + 1) / blocks) - 1
        neighbours = sum(math.comb(widths[0], flipped) for flipped in range(radius + 1))
        if neighbours > MAX_BLOCK_NEIGHBOURS:
            continue
        # lookups, plus the candidates a random hash meets in its block's buckets
        cost = blocks * neighbours * (1 + count / 2 ** widths[-1])
        if best is None or cost < best[0]:
            best = (cost, widths, radius)
    if best is None:  # k close to 64: about every pair is within it
        return [64], 64
    return best[1], best[2]


def flip_masks(width: int, radius: int) -> np.ndarray:
    """Every value of `width` bits with at most `radius` bits set: XOR-ed with a block, its neighbours."""
    masks = [sum(1 << bit for bit in bits) for flipped in range(radius + 1)
             for bits in itertools.combinations(range(width), flipped)]
    return np.array(masks, dtype=np.uint64)


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair (i, j), i < j, of 64-bit hashes at most `max_distance` bits apart, as rows of an (m, 2)
    array sorted by j, then i: multi-index hashing (Norouzi et al.), exact, not all-pairs.

    Each block of the hashes is sorted once; for each hash the block values within r bits of its own are
    looked up in it, and the hashes found there are checked on all 64 bits.
    """
    count = len(hashes)
    if max_distance >= 64:
        first, second = np.triu_indices(count, k=1)
        return np.stack([first, second], axis=1)[np.lexsort((first, second))]
    widths, radius = block_layout(count, max_distance)
    found = []
    shift = 0
    for width in widths:
        block = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        shift += width
        order = np.argsort(block, kind="stable")
        ordered = block[order]
        for mask in flip_masks(width, radius):
            wanted = block ^ mask
            start = np.searchsorted(ordered, wanted, side="left")
            sizes = np.searchsorted(ordered, wanted, side="right") - start
            if not sizes.any():
                continue
            query = np.repeat(np.arange(count), sizes)
            ends = np.cumsum(sizes)
            other = order[np.arange(ends[-1]) - np.repeat(ends - sizes - start, sizes)]
            keep = query < other
            query, other = query[keep], other[keep]
            close = np.bitwise_count(hashes[query] ^ hashes[other]) <= max_distance
            found.append(query[close].astype(np.int64) * count + other[close])
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    keys = np.unique(np.concatenate(found))
    pairs = np.stack([keys // count, keys % count], axis=1)
    return pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]


def colour_thumbnail(source: ImageSource, max_pixels: int) -> Image.Image:
    """The image as 8-bit RGB of at most 64×64 px, read again (only candidates are)."""
    with pixel_limit(max_pixels), Image.open(opened(source)) as image:
        small = eight_bit(image).convert("RGB")
    small.thumbnail((STATS_SIDE, STATS_SIDE), Image.Resampling.BOX)
    return small


def colour_grids(image: Image.Image) -> np.ndarray:
    """Mean colours on a 24×24 grid after each small crop (shares cut off the left, top, right and
    bottom, from CROP_STEPS), stacked: (crops, 24, 24, 3); the first is uncropped."""
    width, height = image.size
    grids = [image.resize((COMPARE_SIDE, COMPARE_SIDE), Image.Resampling.BOX,
                          box=(left * width, top * height, width * (1 - right), height * (1 - bottom)))
             for left, top, right, bottom in itertools.product(CROP_STEPS, repeat=4)]
    return np.stack([np.asarray(grid, dtype=np.float32) for grid in grids])


def neighbourhood_range(grids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell and channel, the lowest and highest value in the 3×3 cells around it."""
    padded = np.pad(grids, [(0, 0)] * (grids.ndim - 3) + [(1, 1), (1, 1), (0, 0)], mode="edge")
    shifted = [padded[..., row:row + COMPARE_SIDE, column:column + COMPARE_SIDE, :]
               for row in range(3) for column in range(3)]
    return functools.reduce(np.minimum, shifted), functools.reduce(np.maximum, shifted)


def unexplained_colour(grids: np.ndarray, reference_range: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per grid, the largest amount (mean over channels, 0-255) by which a cell lies outside the range of
    colours around the same cell of the reference.

    A re-encode or resize changes each cell a little; a cell that a slight shift moved across an edge
    mixes the colours either side of it, which stay within the range. A recoloured shape or a new
    object has colours its neighbourhood in the reference does not.
    """
    low, high = reference_range
    outside = np.maximum(low - grids, 0) + np.maximum(grids - high, 0)
    return outside.mean(axis=-1).max(axis=(-2, -1))


def colour_difference(first: Image.Image, second: Image.Image) -> float:
    """How much of either image the other cannot explain (both ways), at the best of the small crops of
    either: a crop of one is matched by cropping the other the same way."""
    first_grids, second_grids = colour_grids(first), colour_grids(second)
    best = math.inf
    for cropped, reference in ((first_grids, second_grids[0]), (second_grids, first_grids[0])):
        both_ways = np.maximum(unexplained_colour(cropped, neighbourhood_range(reference)),
                               unexplained_colour(reference, neighbourhood_range(cropped)))
        best = min(best, float(both_ways.min()))
    return best


def near_duplicate_of(hashes: list[int | None], source: Callable[[int], ImageSource], labels: list[str],
                      max_distance: int, max_colour_difference: float, max_pixels: int) -> list[str | None]:
    """For each image, the label of the earliest earlier image whose dHash is at most `max_distance`
    bits away and whose colours differ by at most `max_colour_difference` (see `colour_difference`).

    The first of a group keeps None, so it stays. Only candidate pairs are read again and compared.
    """
    known = [index for index, value in enumerate(hashes) if value is not None]
    found: list[str | None] = [None] * len(hashes)
    values = np.array([hashes[index] for index in known], dtype=np.uint64)

    @functools.lru_cache(maxsize=THUMBNAILS_KEPT)
    def thumbnail(index: int) -> Image.Image:
        return colour_thumbnail(source(index), max_pixels)

    for first, second in near_duplicate_pairs(values, max_distance).tolist():
        earlier, later = known[first], known[second]
        if found[later] is not None:
            continue
        difference = colour_difference(thumbnail(earlier), thumbnail(later))
        if difference <= max_colour_difference:
            bits = int(np.bitwise_count(values[first] ^ values[second]))
            found[later] = f"{labels[earlier]} ({bits} bits apart, colour difference {difference:.1f})"
    return found
