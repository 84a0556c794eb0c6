"""Near-duplicate detection: precision and recall of the validate check, and how the candidate index scales.

    .venv/bin/python bench/near_duplicates.py [--groups 100] [--seed 0] [--sizes 10000 100000 1000000]

1. Quality. Draws --groups distinct base pictures (96 px: a coloured ground and 3-5 random rectangles,
   ellipses and triangles; fixed seed) and, for each, copies that ARE near-duplicates (JPEG at quality 40,
   60 and 85; resized to 64 and to 160 px; two crops of up to 3 % per edge, resized back) and distinct
   look-alikes that are NOT (the top shape recoloured; the channels swapped; a small 10-15 px object added;
   one shape moved by 8-13 px; each changing at least 1 % of the pixels clearly). The images go through
   validate's own per-row measurements at the default params (`pipeline.stages.validate.row_properties`), base
   first in each group: a copy should be reported as a near-duplicate of an earlier image, and a base or a
   look-alike should not. Prints precision and recall over the copies, per kind, and the same for the grey
   dHash alone (every candidate accepted), which is what validate did before.
2. Speed. Times the candidate index (`near_duplicate_pairs`) at each of --sizes random 64-bit hashes, of
   which a tenth are copies of others with 0-6 bits flipped, next to an all-pairs scan at the smallest size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline.core.config import ValidateParams
from pipeline.quality.image_checks import property_columns
from pipeline.quality.manifest_checks import ImageFiles, row_properties
from pipeline.quality.near_duplicates import near_duplicate_pairs

SIDE = 96
CLEAR_CHANGE = 120  # summed over the channels (40 a channel on average): a pixel changed by more clearly differs
MIN_CHANGED_SHARE = 0.01

Shape = tuple[int, tuple[int, int, int, int], tuple[int, int, int]]  # kind, box, colour


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(value) for value in rng.integers(0, 256, 3))


def random_picture(rng: np.random.Generator) -> tuple[tuple[int, int, int], list[Shape]]:
    shapes = []
    for _ in range(int(rng.integers(3, 6))):
        left, top = (int(value) for value in rng.integers(0, SIDE - 20, 2))
        width, height = (int(value) for value in rng.integers(16, 56, 2))
        shapes.append((int(rng.integers(0, 3)), (left, top, left + width, top + height), random_colour(rng)))
    return random_colour(rng), shapes


def draw(ground: tuple[int, int, int], shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (SIDE, SIDE), ground)
    pen = ImageDraw.Draw(image)
    for kind, (left, top, right, bottom), colour in shapes:
        if kind == 0:
            pen.rectangle((left, top, right, bottom), fill=colour)
        elif kind == 1:
            pen.ellipse((left, top, right, bottom), fill=colour)
        else:
            pen.polygon([(left, bottom), ((left + right) // 2, top), (right, bottom)], fill=colour)
    return image


def copies(image: Image.Image, rng: np.random.Generator) -> dict[str, tuple[Image.Image, dict]]:
    """Near-duplicates of `image`: (picture, save options) by kind."""
    found = {f"jpeg q{quality}": (image, dict(format="JPEG", quality=quality)) for quality in (40, 60, 85)}
    found["resized to 64 px"] = (image.resize((64, 64), Image.Resampling.BICUBIC), dict(format="PNG"))
    found["resized to 160 px, jpeg q80"] = (image.resize((160, 160), Image.Resampling.BICUBIC),
                                            dict(format="JPEG", quality=80))
    for number in (1, 2):
        left, top, right, bottom = (rng.uniform(0, 0.03, 4) * SIDE).round().astype(int)
        cropped = image.crop((left, top, SIDE - right, SIDE - bottom)).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        found[f"crop {number} (<= 3 % per edge)"] = (cropped, dict(format="PNG"))
    return found


def changed_share(first: Image.Image, second: Image.Image) -> float:
    difference = np.abs(np.asarray(first, dtype=np.int16) - np.asarray(second, dtype=np.int16)).sum(axis=2)
    return float((difference > CLEAR_CHANGE).mean())


def look_alikes(ground, shapes: list[Shape], rng: np.random.Generator) -> dict[str, Image.Image]:
    """Distinct pictures that share the base's layout; each is redrawn until it clearly differs."""
    base = draw(ground, shapes)

    def recoloured():
        kind, box, _ = shapes[-1]
        return draw(ground, shapes[:-1] + [(kind, box, random_colour(rng))])

    def channels_swapped():
        return Image.fromarray(np.asarray(base)[:, :, list(rng.permutation(3))])

    def small_object_added():
        left, top = (int(value) for value in rng.integers(4, SIDE - 20, 2))
        size = int(rng.integers(10, 16))
        return draw(ground, shapes + [(int(rng.integers(0, 3)), (left, top, left + size, top + size),
                                       random_colour(rng))])

    def shape_moved():
        kind, (left, top, right, bottom), colour = shapes[-1]
        step = int(rng.integers(8, 14)) * int(rng.choice([-1, 1]))
        return draw(ground, shapes[:-1] + [(kind, (left + step, top, right + step, bottom), colour)])

    found = {}
    for name, make in (("top shape recoloured", recoloured), ("channels swapped", channels_swapped),
                       ("small object added", small_object_added), ("one shape moved", shape_moved)):
        for _ in range(50):
            candidate = make()
            if changed_share(base, candidate) >= MIN_CHANGED_SHARE:
                found[name] = candidate
                break
    return found


def labelled_set(folder: Path, groups: int, seed: int) -> pd.DataFrame:
    """The images as a raw manifest (relative paths), with `kind` and `copy` (a near-duplicate or not)."""
    rng = np.random.default_rng(seed)
    rows = []
    for group in range(groups):
        ground, shapes = random_picture(rng)
        base = draw(ground, shapes)
        entries = [("base", base, dict(format="PNG"), False)]
        entries += [(kind, image, options, True) for kind, (image, options) in copies(base, rng).items()]
        entries += [(kind, image, dict(format="PNG"), False)
                    for kind, image in look_alikes(ground, shapes, rng).items()]
        for number, (kind, image, options, is_copy) in enumerate(entries):
            name = f"{group:05d}-{number}.{'jpg' if options['format'] == 'JPEG' else 'png'}"
            image.save(folder / name, **options)
            rows.append(dict(id=name, path=name, caption="shapes", width=image.width, height=image.height,
                             origin=name, kind=kind, copy=is_copy))
    return pd.DataFrame(rows)


def quality(manifest: pd.DataFrame, folder: Path, params: ValidateParams) -> tuple[pd.DataFrame, float]:
    """Which images validate reports as a near-duplicate of an earlier one, and the seconds it took."""
    started = time.perf_counter()
    flagged = row_properties(manifest, ImageFiles(folder), params)["near_duplicate_of"].notna()
    seconds = time.perf_counter() - started
    return manifest.assign(flagged=flagged.to_numpy()), seconds


def grey_hash_only(manifest: pd.DataFrame, folder: Path, params: ValidateParams) -> tuple[pd.DataFrame, float]:
    """What validate did before: an image within max_near_duplicate_distance bits of an earlier one."""
    started = time.perf_counter()
    hashes = property_columns([folder / path for path in manifest["path"]], params.max_pixels,
                              params.near_duplicate_min_side)["dhash"]
    later = near_duplicate_pairs(np.array(hashes, dtype=np.uint64), params.max_near_duplicate_distance)[:, 1]
    seconds = time.perf_counter() - started
    return manifest.assign(flagged=np.isin(np.arange(len(manifest)), later)), seconds


def report_quality(name: str, judged: pd.DataFrame, seconds: float) -> None:
    caught = int((judged["flagged"] & judged["copy"]).sum())
    flagged, copies_total = int(judged["flagged"].sum()), int(judged["copy"].sum())
    print(f"\n{name}: precision {caught / max(flagged, 1):.4f} ({caught} of {flagged} flagged are copies), "
          f"recall {caught / copies_total:.4f} ({caught} of {copies_total} copies), "
          f"{len(judged)} images in {seconds:.1f} s")
    for kind, rows in judged.groupby("kind", sort=False):
        print(f"  {kind:32s} flagged {int(rows['flagged'].sum()):4d} of {len(rows)}")


def perturbed_hashes(count: int, rng: np.random.Generator) -> np.ndarray:
    hashes = rng.integers(0, 2**64, count, dtype=np.uint64, endpoint=False)
    copied = rng.choice(count, count // 10, replace=False)
    sources = rng.integers(0, count, len(copied))
    flips = np.zeros(len(copied), dtype=np.uint64)
    for _ in range(6):  # up to 6 random bits, some of them the same bit twice
        bits = rng.integers(0, 64, len(copied)).astype(np.uint64)
        flips ^= np.where(rng.random(len(copied)) < 0.5, np.uint64(1) << bits, np.uint64(0))
    hashes[copied] = hashes[sources] ^ flips
    return hashes


def all_pairs_seconds(hashes: np.ndarray, max_distance: int) -> tuple[float, int]:
    """What validate did before: each hash against every earlier one."""
    started = time.perf_counter()
    pairs = 0
    for position in range(1, len(hashes)):
        pairs += int((np.bitwise_count(hashes[:position] ^ hashes[position]) <= max_distance).sum())
    return time.perf_counter() - started, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="draws the labelled set (the thresholds were chosen on 0)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    options = parser.parse_args()
    params = ValidateParams()
    with tempfile.TemporaryDirectory(prefix="sdpipe-near-duplicates-") as directory:
        folder = Path(directory)
        manifest = labelled_set(folder, options.groups, options.seed)
        report_quality(f"validate at the default params (dHash <= {params.max_near_duplicate_distance} bits, "
                       f"colour difference <= {params.max_near_duplicate_colour_difference:g})",
                       *quality(manifest, folder, params))
        report_quality(f"the grey dHash alone (<= {params.max_near_duplicate_distance} bits, as before)",
                       *grey_hash_only(manifest, folder, params))
    rng = np.random.default_rng(options.seed)
    print(f"\ncandidate pairs within {params.max_near_duplicate_distance} bits:")
    for size in options.sizes:
        hashes = perturbed_hashes(size, rng)
        started = time.perf_counter()
        pairs = near_duplicate_pairs(hashes, params.max_near_duplicate_distance)
        print(f"  {size:>9,} hashes: index {time.perf_counter() - started:7.2f} s, {len(pairs):,} pairs")
        if size == min(options.sizes):
            seconds, found = all_pairs_seconds(hashes, params.max_near_duplicate_distance)
            print(f"  {size:>9,} hashes: all pairs {seconds:7.2f} s, {found:,} pairs")


if __name__ == "__main__":
    main()
