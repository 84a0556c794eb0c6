"""Stage `ingest`: bring samples from the configured source into data/raw with a manifest.

Writes data/raw/images/<sha256>.<ext> and data/raw/manifest.parquet with one row per sample:
id (sha256 of the file's bytes), path (relative to data/raw), caption, width, height, format,
bytes, source. Identical content is stored once.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from pipeline.atomic import atomic_dir
from pipeline.config import IngestParams, Paths
from pipeline.sources import synthetic

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
IMAGES_DIR = "images"
MANIFEST_COLUMNS = ("id", "path", "caption", "width", "height", "format", "bytes", "source")


@dataclass(frozen=True)
class IngestResult:
    ingested: int
    duplicates: int
    manifest: Path


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_image(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) read from the header only; no pixels are decoded here."""
    with Image.open(io.BytesIO(data)) as image:
        return image.width, image.height, (image.format or "unknown").lower()


def _source_samples(params: IngestParams):
    """Yield (bytes, caption) pairs from the configured source."""
    settings = params.synthetic
    for sample in synthetic.generate(
        count=settings.count,
        resolution=settings.resolution,
        seed=settings.seed,
        min_size=settings.min_size,
        max_size=settings.max_size,
    ):
        yield sample.png, sample.caption


def ingest(params: IngestParams, paths: Paths) -> IngestResult:
    rows: list[dict] = []
    seen: set[str] = set()
    duplicates = 0
    with atomic_dir(paths.raw) as staging:
        (staging / IMAGES_DIR).mkdir()
        for data, caption in _source_samples(params):
            sample_id = content_id(data)
            if sample_id in seen:
                duplicates += 1
                continue
            seen.add(sample_id)
            width, height, fmt = describe_image(data)
            relative = f"{IMAGES_DIR}/{sample_id}.{fmt}"
            (staging / relative).write_bytes(data)
            rows.append(
                dict(id=sample_id, path=relative, caption=caption, width=width, height=height,
                     format=fmt, bytes=len(data), source=params.source)
            )
        pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_parquet(staging / MANIFEST, index=False)
    log.info("ingest: %d samples from %s, %d duplicates skipped", len(rows), params.source, duplicates)
    return IngestResult(len(rows), duplicates, paths.raw / MANIFEST)
