"""The data stages' files: the raw manifest and ingest's rejects (data/raw), the validated manifest
(data/validated) and the processed splits (data/processed/{train,val}) with the training set's drift
reference, and their readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.contracts.paths import Paths

MANIFEST = "manifest.parquet"  # in data/raw, data/validated and each processed split
# data/raw/manifest.parquet (and, the rows validation kept, data/validated/manifest.parquet)
RAW_MANIFEST_COLUMNS = ("id", "path", "caption", "width", "height", "format", "bytes", "source", "origin")
REJECTED = "rejected.parquet"  # data/raw: what the source offered but ingest could not take
REJECTED_COLUMNS = ("origin", "reason")

# data/processed
SPLITS = ("train", "val")
PROCESSED_MANIFEST_COLUMNS = ("id", "file", "caption", "width", "height", "crop", "recipe", "sha256")
STATS = "stats.json"
REFERENCE_FEATURES = "reference_features.parquet"


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def read_images(folder: Path, names: pd.Series) -> np.ndarray:
    """PNGs of one size as uint8 NHWC, in the order named."""
    return np.stack([read_png(folder / name) for name in names])


def load_split_groups(paths: Paths, split: str) -> list[tuple[np.ndarray, pd.DataFrame]]:
    """A processed split's images grouped by size: for each (height, width), in that order, the images as
    uint8 NHWC with their manifest rows (manifest order, index from 0). One group unless the split is the
    train split of a bucketed run."""
    manifest = pd.read_parquet(paths.processed / split / MANIFEST)
    return [(read_images(paths.processed / split, rows["file"]), rows.reset_index(drop=True))
            for _, rows in manifest.groupby(["height", "width"], sort=True)]


def load_split(paths: Paths, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    """All images of a processed split as uint8 NHWC, with their manifest rows in the same order.

    The split must hold one size; a bucketed train split does not (read it with load_split_groups).
    """
    location = paths.processed / split / MANIFEST
    manifest = pd.read_parquet(location)
    sizes = sorted(set(zip(manifest["width"], manifest["height"], strict=True)))
    if len(sizes) > 1:
        raise ValueError(
            f"{location}: the {split} split holds images of {len(sizes)} sizes (width x height: "
            f"{', '.join(f'{width}x{height}' for width, height in sizes)}), from preprocess.bucketing; "
            "read it one size at a time with pipeline.contracts.data.load_split_groups"
        )
    return read_images(paths.processed / split, manifest["file"]), manifest
