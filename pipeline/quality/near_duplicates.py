"""Near-duplicates across a corpus, in two steps, with no all-pairs scan.

Candidates: pairs of dHashes (pipeline.quality.image_checks) within a few bits, from a multi-index over
blocks of the hash. Confirmation: the two images are read again and compared in colour on a 24×24 grid,
allowing for re-encoding, resizing and a small crop; only a pair that also looks alike there is a
near-duplicate. The grey hash alone cannot tell a red circle from a green one of the same brightness, or a
picture from one with a small object added.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from pipeline.data.images import ImageSource, opened, pixel_limit, to_rgb
from pipeline.quality.image_checks import STATS_SIDE

COMPARE_SIDE = 24  # the colour grid near-duplicate candidates are confirmed on
# Crops tried when confirming a candidate: 0, 1 or 2 of 64 px off each edge (a crop of up to ~3 % per edge).
CROP_STEPS = (0.0, 1 / 64, 2 / 64)
THUMBNAILS_KEPT = 4096  # ~12 KB each: the images of many candidate pairs are read once, within ~50 MB
MAX_BLOCK_NEIGHBOURS = 100_000  # a multi-index layout that would look up more values per hash is not tried


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
        small = to_rgb(image)
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
