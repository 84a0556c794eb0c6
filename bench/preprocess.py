"""Preprocessing speed: the worker pool versus a single process, on the same generated images.

    .venv/bin/python bench/preprocess.py [--images 2000] [--workers N (default: all cores)]

Generates --images random-content 512x512 JPEGs (fixed seed) as a validated project in a temporary
folder, then runs the `preprocess` stage to 64x64 from scratch with workers=1 and with workers=N, one
after the other in this invocation; prints images/s of each and the ratio, and checks both wrote the
same files. Last it times a re-run with nothing new, where every image is reused.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import PreprocessParams
from pipeline.contracts.paths import Paths
from pipeline.contracts.data import MANIFEST
from pipeline.images import content_id
from pipeline.preprocess import preprocess

SIDE = 512
RESOLUTION = 64
SEED = 0


def random_jpeg(rng: np.random.Generator) -> bytes:
    """Smooth random colour fields plus grain: decodes like a photo, unlike pure noise, at ~30 KB."""
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIDE, SIDE), Image.BICUBIC)
    grain = rng.normal(0, 8, (SIDE, SIDE, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def validated_project(root: Path, count: int) -> Paths:
    """data/raw/images/*.jpg and a validated manifest, as ingest and validate would leave them."""
    paths = Paths(root)
    images = paths.raw / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    rows = []
    for number in range(count):
        data = random_jpeg(rng)
        sample_id = content_id(data)
        (images / f"{sample_id}.jpg").write_bytes(data)
        rows.append(dict(id=sample_id, path=f"images/{sample_id}.jpg", caption=f"random field {number}",
                         width=SIDE, height=SIDE))
    paths.validated.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(paths.validated / MANIFEST, index=False)
    return paths


def timed_preprocess(paths: Paths, workers: int, *, from_scratch: bool = True) -> tuple[float, dict[str, bytes]]:
    if from_scratch:  # otherwise the run would reuse the images the one before it converted
        shutil.rmtree(paths.processed, ignore_errors=True)
    started = time.perf_counter()
    preprocess(PreprocessParams(resolution=RESOLUTION, workers=workers), paths)
    seconds = time.perf_counter() - started
    return seconds, {p.name: p.read_bytes() for p in sorted(paths.processed.rglob("*.png"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdpipe-bench-") as folder:
        started = time.perf_counter()
        paths = validated_project(Path(folder), args.images)
        print(f"generated {args.images} {SIDE}x{SIDE} JPEGs in {time.perf_counter() - started:.1f} s")
        single_seconds, single_files = timed_preprocess(paths, workers=1)
        pooled_seconds, pooled_files = timed_preprocess(paths, workers=args.workers)
        rerun_seconds, rerun_files = timed_preprocess(paths, workers=args.workers, from_scratch=False)
    assert pooled_files == single_files, "the worker pool wrote different images than one process"
    assert rerun_files == single_files, "a re-run with nothing new changed the images"
    single, pooled = args.images / single_seconds, args.images / pooled_seconds
    print(f"{'1 process':<12} {single:8.1f} images/s  ({single_seconds:.1f} s)")
    print(f"{f'{args.workers} workers':<12} {pooled:8.1f} images/s  ({pooled_seconds:.1f} s)")
    print(f"speed-up {pooled / single:.2f}x on {os.cpu_count()} cores; outputs identical")
    rerun = args.images / rerun_seconds
    print(f"{'re-run':<12} {rerun:8.1f} images/s  ({rerun_seconds:.1f} s; nothing new, every image reused)")


if __name__ == "__main__":
    main()
