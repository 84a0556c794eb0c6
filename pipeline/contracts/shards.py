"""Image shards: the files data/raw and data/processed keep their images in.

A shard is a Parquet file with one row per image: `id` and `image` (the image file's bytes), plus any
per-image columns its writer adds. Parquet rather than webdataset tars: a reader takes only the columns
it needs (the manifest-like columns without the bytes), reads one row group at a time, and Ray Data and
pandas read it natively. A shard is named by a hash of what it holds, is written once (to a temporary
name, then renamed) and never rewritten: a run that adds images writes new shards, so DVC re-hashes only
those and stores each once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.atomic import atomic_file

SHARDS_DIR = "shards"
IMAGE = "image"
# data/raw: the bytes of the mask file a source paired with the image (a shard without any has no such column);
# data/processed with preprocess.masks: the image's mask as PNG ("L") bytes. Null where an image has none.
MASK = "mask"
ROW_GROUP_SIZE = 100  # images a reader decodes at a time


def shard_name(prefix: str, members: Iterable[str], suffix: str = ".parquet") -> str:
    """`shards/<prefix>-<hash of the member keys><suffix>`: the same content always gets the same name."""
    digest = hashlib.sha256("\n".join(members).encode()).hexdigest()[:20]
    return f"{SHARDS_DIR}/{prefix}-{digest}{suffix}"


def write_shard(target: Path, ids: Sequence[str], images: Sequence[bytes], columns: dict | None = None) -> None:
    """Write a shard atomically: `id`, `image` and any further per-image columns."""
    table = pa.table({"id": pa.array(ids, pa.string()), IMAGE: pa.array(images, pa.binary()), **(columns or {})})
    with atomic_file(target) as staging:
        pq.write_table(table, staging, row_group_size=ROW_GROUP_SIZE)


def read_shard(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A shard's rows (all columns, or those named), indexed by id."""
    wanted = None if columns is None else ["id", *[c for c in columns if c != "id"]]
    try:
        return pq.read_table(path, columns=wanted).to_pandas().set_index("id")
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"{path}: not a readable image shard ({error})") from error


def shard_images(path: Path) -> pd.Series:
    """A shard's image bytes, indexed by id."""
    return read_shard(path, [IMAGE])[IMAGE]


def shard_masks(path: Path) -> pd.Series:
    """A data/raw shard's mask files' bytes, indexed by id (None for an image without); empty where it has none."""
    try:
        has_masks = MASK in pq.read_schema(path).names
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"{path}: not a readable image shard ({error})") from error
    return read_shard(path, [MASK])[MASK] if has_masks else pd.Series(dtype=object)


def image_bytes(root: Path, rows: pd.DataFrame) -> list[bytes]:
    """The bytes of each row's image (rows with `id` and `shard`, relative to `root`), in row order; each
    shard is read once."""
    found: dict[str, bytes] = {}
    for shard, members in rows.groupby("shard", sort=False):
        found.update(read_members(root / shard, members["id"], [IMAGE])[IMAGE].items())
    return [found[sample_id] for sample_id in rows["id"]]


def read_members(path: Path, ids: Iterable[str], columns: Sequence[str]) -> pd.DataFrame:
    """The rows of these ids from a shard, in their order; a ValueError names those it lacks."""
    ids = list(ids)
    rows = read_shard(path, columns)
    missing = set(ids) - set(rows.index)
    if missing:
        raise ValueError(f"{path}: lacks image(s) {', '.join(sorted(missing)[:3])} its manifest lists")
    return rows.loc[ids]


def unreferenced_shards(root: Path, referenced: Iterable[str]) -> list[Path]:
    """Shards under root/shards that no manifest row names any more."""
    kept = {root / name for name in referenced}
    folder = root / SHARDS_DIR
    return sorted(path for path in folder.iterdir() if path not in kept) if folder.is_dir() else []
