"""The data stages' files: the raw manifest, shards and ingest's rejects (data/raw), the validated manifest
(data/validated) and the processed splits (data/processed/{train,val} manifests, their images in
data/processed/shards) with the training set's drift reference, and their readers. Images live in
shards (`pipeline.contracts.shards`); a manifest row names its shard relative to data/raw or
data/processed."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.contracts.paths import Paths
from pipeline.contracts.shards import image_bytes

MANIFEST = "manifest.parquet"  # in data/raw, data/validated and each processed split
# data/raw/manifest.parquet (and, the rows validation kept, data/validated/manifest.parquet)
RAW_MANIFEST_COLUMNS = ("id", "shard", "caption", "width", "height", "format", "bytes", "source", "origin",
                        "subset")
REJECTED = "rejected.parquet"  # data/raw: what the source offered but ingest could not take
REJECTED_COLUMNS = ("origin", "reason")

# data/processed
SPLITS = ("train", "val")
PROCESSED_MANIFEST_COLUMNS = ("id", "shard", "caption", "width", "height", "crop", "recipe", "sha256",
                              "original_width", "original_height", "crop_left", "crop_top", "subset")
# preprocess.masks: one more column, the hash of the image's mask PNG (null where the image has no mask)
MASK_SHA256 = "mask_sha256"
STATS = "stats.json"
REFERENCE_FEATURES = "reference_features.parquet"
IMAGES_PER_CHUNK = 1024  # images decoded at a time by `split_chunks`


def processed_columns(masked: bool) -> tuple[str, ...]:
    """The processed manifests' columns: MASK_SHA256 too where preprocess kept masks."""
    return (*PROCESSED_MANIFEST_COLUMNS, MASK_SHA256) if masked else PROCESSED_MANIFEST_COLUMNS


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def read_images(paths: Paths, rows: pd.DataFrame) -> np.ndarray:
    """Processed images of one size as uint8 NHWC, in the order of the manifest rows given."""
    return np.stack([decode_png(data) for data in image_bytes(paths.processed, rows)])


def split_groups(paths: Paths, split: str) -> list[pd.DataFrame]:
    """A processed split's manifest rows grouped by size: for each (height, width), in that order, its rows
    (manifest order, index from 0). One group unless the split is the train split of a bucketed run."""
    manifest = pd.read_parquet(paths.processed / split / MANIFEST)
    return [rows.reset_index(drop=True) for _, rows in manifest.groupby(["height", "width"], sort=True)]


def split_chunks(paths: Paths, split: str, chunk: int = IMAGES_PER_CHUNK) -> Iterator[np.ndarray]:
    """A processed split's images as uint8 NHWC, `chunk` at a time, one size per chunk: for measurements
    over a whole split, which need not fit in memory."""
    for rows in split_groups(paths, split):
        for start in range(0, len(rows), chunk):
            yield read_images(paths, rows.iloc[start:start + chunk])


def load_split_groups(paths: Paths, split: str) -> list[tuple[np.ndarray, pd.DataFrame]]:
    """split_groups with each group's images as uint8 NHWC."""
    return [(read_images(paths, rows), rows) for rows in split_groups(paths, split)]


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
    return read_images(paths, manifest), manifest
