"""Preprocessing speed: Ray with N CPUs versus one, on the same generated photo-sized images.

    .venv/bin/python bench/preprocess.py [--images 2000] [--workers N (default: all cores)]

Generates --images random-content 512x512 JPEGs (fixed seed) as a validated project in a temporary
folder (data/raw shards of 200), then runs the `preprocess` stage to 64x64 from scratch on an in-process
Ray of 1 CPU and of N CPUs, one after the other in this invocation (Ray's start-up not timed); prints
images/s of each and the ratio, and checks both wrote the same shards. Last it times a re-run with nothing
new, where every shard is reused.
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

from pipeline.contracts.data import MANIFEST
from pipeline.contracts.paths import Paths
from pipeline.contracts.shards import shard_name, write_shard
from pipeline.core.config import PreprocessParams, RayParams
from pipeline.data.images import content_id
from pipeline.runtime.ray_tasks import ray_session
from pipeline.stages.preprocess import preprocess

SIDE = 512
RESOLUTION = 64
SEED = 0
SHARD_SIZE = 200


def random_jpeg(rng: np.random.Generator) -> bytes:
    """Smooth random colour fields plus grain: decodes like a photo, unlike pure noise, at ~30 KB."""
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIDE, SIDE), Image.BICUBIC)
    grain = rng.normal(0, 8, (SIDE, SIDE, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def validated_project(root: Path, count: int) -> Paths:
    """data/raw shards of JPEGs and a validated manifest, as ingest and validate would leave them."""
    paths = Paths(root)
    rng = np.random.default_rng(SEED)
    rows, shard = [], {}
    for number in range(count):
        data = random_jpeg(rng)
        shard[content_id(data)] = data
        if len(shard) == SHARD_SIZE or number == count - 1:
            name = shard_name("raw", shard)
            write_shard(paths.raw / name, list(shard), list(shard.values()))
            rows += [dict(id=sample_id, shard=name, caption=f"random field {len(rows) + index}", width=SIDE,
                          height=SIDE) for index, sample_id in enumerate(shard)]
            shard = {}
    paths.validated.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(paths.validated / MANIFEST, index=False)
    return paths


def timed_preprocess(paths: Paths, workers: int, *, from_scratch: bool = True) -> tuple[float, dict[str, bytes]]:
    if from_scratch:  # otherwise the run would reuse the shards the one before it converted
        shutil.rmtree(paths.processed, ignore_errors=True)
    with ray_session(RayParams(num_cpus=workers)):
        started = time.perf_counter()
        preprocess(PreprocessParams(resolution=RESOLUTION), paths)
        seconds = time.perf_counter() - started
    return seconds, {p.name: p.read_bytes() for p in sorted(paths.processed.rglob("*.parquet"))}


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
    assert pooled_files == single_files, "N Ray CPUs wrote different shards than one"
    assert rerun_files == single_files, "a re-run with nothing new changed the images"
    single, pooled = args.images / single_seconds, args.images / pooled_seconds
    print(f"{'1 CPU':<12} {single:8.1f} images/s  ({single_seconds:.1f} s)")
    print(f"{f'{args.workers} CPUs':<12} {pooled:8.1f} images/s  ({pooled_seconds:.1f} s)")
    print(f"speed-up {pooled / single:.2f}x on {os.cpu_count()} cores; outputs identical")
    rerun = args.images / rerun_seconds
    print(f"{'re-run':<12} {rerun:8.1f} images/s  ({rerun_seconds:.1f} s; nothing new, every shard reused)")


if __name__ == "__main__":
    main()
