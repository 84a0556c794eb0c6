"""Aspect-ratio buckets: the sizes a non-square training set is cropped to (`preprocess.bucketing`).

The kohya / NovelAI scheme: for every width that is a multiple of `step`, the tallest height, also a
multiple of `step`, whose area is within resolution² and whose aspect ratio is within
[1/max_ratio, max_ratio]; each is also taken turned on its side, and of the buckets with one aspect
ratio only the largest is kept. (Every pair of multiples would also keep small odd ratios, such as 16×24
at 32 px, that an image near 2:3 would be shrunk into.) An image goes to the bucket whose log aspect
ratio is closest to its own, so 2:1 and 1:2 are equally far from a square.
"""

from __future__ import annotations

import math
from fractions import Fraction

Size = tuple[int, int]  # (width, height) in pixels, as Pillow gives them


def bucket_sizes(resolution: int, step: int, max_ratio: float) -> tuple[Size, ...]:
    """Every bucket as (width, height), from the tallest to the widest."""
    area = resolution * resolution
    largest: dict[Fraction, Size] = {}
    for width in range(step, area // step + 1, step):
        height = min(area // width // step * step, int(width * max_ratio) // step * step)
        if height < step or height * max_ratio < width:
            continue
        for size in ((width, height), (height, width)):
            ratio = Fraction(*size)
            if ratio not in largest or pixels(size) > pixels(largest[ratio]):
                largest[ratio] = size
    return tuple(largest[ratio] for ratio in sorted(largest))


def pixels(size: Size) -> int:
    return size[0] * size[1]


def log_ratio(size: Size) -> float:
    return math.log(size[0] / size[1])


def nearest_bucket(size: Size, buckets: tuple[Size, ...]) -> Size:
    """The bucket whose log aspect ratio is closest to the image's; between two, the larger one."""
    ratio = log_ratio(size)
    return min(buckets, key=lambda bucket: (abs(log_ratio(bucket) - ratio), -pixels(bucket)))


def beyond_widest(size: Size, buckets: tuple[Size, ...]) -> bool:
    """Whether an image is more elongated than every bucket, so fitting it crops more than bucketing means to.

    The buckets come in both orientations, so an image's EXIF rotation does not change the answer.
    """
    return abs(log_ratio(size)) > max(abs(log_ratio(bucket)) for bucket in buckets)
