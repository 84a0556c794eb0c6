"""Stage `preprocess`: decode, orient, convert to 8-bit RGB, resize and crop, clean captions, split by id.

Writes data/processed/{train,val}/<id>.png with a manifest.parquet each, one row per image:
- id, file, caption: the normalised caption that encode, train and evaluate read;
- width, height: the processed image's size; crop: "center", or the crop position as the two fractions
  ImageOps.fit centres on ("0.123456,0.654321");
- recipe: a hash of everything that decides the processed file; sha256: the file's own hash.
Beside them, reference_features.parquet and stats.json: the training set's drift features
(`pipeline.drift`) per sample and summarised, for the monitoring flow.

Every image is a square at `resolution`, unless `preprocess.bucketing` is on: then each train image is
cropped to the aspect-ratio bucket (`pipeline.buckets`) nearest its own shape, and
`pipeline.contracts.data.load_split_groups` reads the split back one size at a time. Val images stay squares
at `resolution` always: evaluation compares them with the model's square generations.

A re-run converts only what is new: an image whose file the previous data/processed holds in the same
split with the same recipe and intact bytes is hard-linked into the new output (with its drift features
taken from the previous reference_features.parquet); the rest are converted by a pool of
`preprocess.workers` processes. The outputs are the same as a run from scratch, whatever the number of
workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
from PIL import Image

from pipeline.atomic import atomic_dir, write_json
from pipeline.buckets import Size, beyond_widest, bucket_sizes, nearest_bucket
from pipeline.captions import normalise_caption
from pipeline.config import PreprocessParams
from pipeline.contracts.data import MANIFEST, PROCESSED_MANIFEST_COLUMNS, REFERENCE_FEATURES, SPLITS, STATS
from pipeline.contracts.paths import Paths
from pipeline.drift import IMAGE_FEATURES, combine_features, image_features, metadata_features, words_of
from pipeline.images import CENTRE, resize_and_crop, to_rgb

log = logging.getLogger(__name__)

CHUNKS_PER_WORKER = 8  # small enough to balance uneven images, large enough to amortise the hand-over
# Bump whenever to_rgb, integer_to_grey, resize_and_crop or the PNG writing change what an image becomes:
# it is part of every recipe, so the next run converts everything again instead of reusing stale files.
CONVERSION_VERSION = "1"
# What converting an image yields, or reusing it carries over; image features only matter for train.
OUTPUT_TYPES = {"width": "int64", "height": "int64", "sha256": "str"} | dict.fromkeys(IMAGE_FEATURES, "float64")


def split_of(sample_id: str, val_fraction: float) -> str:
    """Deterministic and stable as data is added: a sample's side depends on its id alone."""
    bucket = int(hashlib.sha256(f"split:{sample_id}".encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "val" if bucket < val_fraction else "train"


def crop_centering(sample_id: str, crop: str, seed: int) -> tuple[float, float]:
    """Where to crop, as ImageOps.fit's fractions: the centre, or a position fixed by the id and seed."""
    if crop == "center":
        return CENTRE
    digest = hashlib.sha256(f"crop:{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:4]) / 0xFFFF_FFFF, int.from_bytes(digest[4:8]) / 0xFFFF_FFFF


def crop_label(centering: tuple[float, float]) -> str:
    """The manifest's `crop`: "center", or the two centering fractions to six places."""
    return "center" if centering == CENTRE else f"{centering[0]:.6f},{centering[1]:.6f}"


def target_sizes(params: PreprocessParams) -> dict[str, tuple[Size, ...]]:
    """Per split, the sizes an image may become: the buckets for a bucketed train split, else the square."""
    square = ((params.resolution, params.resolution),)
    buckets = bucket_sizes(params.resolution, params.bucket_step, params.max_bucket_ratio)
    return {"train": buckets if params.bucketing else square, "val": square}


def recipe_of(sample_id: str, resolution: int, sizes: tuple[Size, ...], centering: tuple[float, float]) -> str:
    """A hash of everything that decides an image's processed file.

    The id is the source's content hash. The output size is the square, or whichever of the buckets the
    image's own aspect ratio picks: hashing the candidate sizes pins it without decoding the image first.
    Pillow's version is in as well: its resampling and PNG encoder write the bytes.
    """
    described = dict(id=sample_id, resolution=resolution, sizes=[list(size) for size in sizes],
                     centering=list(centering), conversion=CONVERSION_VERSION, pillow=PIL.__version__)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read (a previous output deleted or unreadable)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass(frozen=True)
class ImageJob:
    """One image for a worker: where to read it, where to write it, and how to size and crop it."""

    source: Path
    target: Path
    sizes: tuple[Size, ...]  # the square, or the buckets its aspect ratio picks from
    resolution: int  # side of the square the drift features are measured on
    centering: tuple[float, float]


def convert_image(job: ImageJob) -> dict:
    """Load, convert, crop and write one image; return its size, its file's sha256 and its drift features.

    The drift features are measured on the square at `resolution`, whatever the image's bucket, because
    monitoring measures new batches that way (`load_training_image`).
    """
    try:
        with Image.open(job.source) as opened:
            image = to_rgb(opened)
        size = nearest_bucket(image.size, job.sizes)
        processed = resize_and_crop(image, size, job.centering)
        processed.save(job.target, format="PNG")
    except Exception as error:  # any decoder or writer failure: the message must name the file
        raise ValueError(f"preprocess: {job.source}: {type(error).__name__}: {error}") from error
    square = (job.resolution, job.resolution)
    measured = processed if size == square else resize_and_crop(image, square, job.centering)
    features = image_features(np.asarray(measured)[None]).to_dict("records")[0]
    return dict(width=size[0], height=size[1], sha256=file_sha256(job.target), **features)


def worker_count(workers: int | None) -> int:
    return workers or os.cpu_count() or 1


def convert_all(jobs: list[ImageJob], workers: int) -> list[dict]:
    """convert_image over the jobs, results in job order; with one worker, in this process."""
    if workers == 1 or len(jobs) <= 1:
        return [convert_image(job) for job in jobs]
    chunksize = max(1, math.ceil(len(jobs) / (workers * CHUNKS_PER_WORKER)))
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return list(pool.map(convert_image, jobs, chunksize=chunksize))


def reference_stats(features: pd.DataFrame, vocabulary: set[str]) -> dict:
    """Summary of the training set's drift features, and the words its captions use."""
    return dict(
        count=len(features),
        features={
            name: dict(mean=float(column.mean()), std=float(column.std(ddof=0)),
                       quantiles=[float(q) for q in column.quantile([0.05, 0.25, 0.5, 0.75, 0.95])])
            for name, column in features.items()
        },
        vocabulary=sorted(vocabulary),
    )


def save_reference(folder: Path, rows: pd.DataFrame) -> None:
    """The training set's per-sample drift features and their summary, for the monitoring flow.

    `rows` are the train split's, with the image features and the source image's size.
    """
    captions = rows["caption"].tolist()
    vocabulary = {word for caption in captions for word in words_of(caption)}
    sizes = list(zip(rows["source_width"], rows["source_height"], strict=True))
    features = combine_features(rows[list(IMAGE_FEATURES)], metadata_features(sizes, captions, vocabulary))
    features.to_parquet(folder / REFERENCE_FEATURES, index=False)
    write_json(folder / STATS, reference_stats(features, vocabulary))


def planned_manifest(params: PreprocessParams, paths: Paths) -> pd.DataFrame:
    """The validated rows with normalised captions, each with its split, file, crop and recipe, in split then
    manifest order. The source image's size is renamed source_width/source_height: width and height name
    the processed size from here on."""
    manifest = pd.read_parquet(paths.validated / MANIFEST).rename(
        columns={"width": "source_width", "height": "source_height"})
    manifest["caption"] = [normalise_caption(c, lowercase=params.lowercase_captions) for c in manifest["caption"]]
    manifest["split"] = pd.Categorical([split_of(i, params.val_fraction) for i in manifest["id"]], SPLITS)
    manifest["file"] = manifest["id"] + ".png"
    counts = manifest["split"].value_counts()
    if not counts["train"] or not counts["val"]:
        raise ValueError(
            f"preprocess: the split left {counts['train']} train and {counts['val']} val samples; "
            "both need at least one (add data or change preprocess.val_fraction)"
        )
    manifest = manifest.sort_values("split", kind="stable").reset_index(drop=True)
    sizes = target_sizes(params)
    manifest["centering"] = [crop_centering(i, params.crop, params.seed) for i in manifest["id"]]
    manifest["crop"] = [crop_label(centering) for centering in manifest["centering"]]
    manifest["recipe"] = [recipe_of(i, params.resolution, sizes[split], centering) for i, split, centering
                          in zip(manifest["id"], manifest["split"], manifest["centering"], strict=True)]
    return manifest


def previous_outputs(folder: Path) -> pd.DataFrame:
    """What the last run wrote, one row per image: split, id, path, recipe and OUTPUT_TYPES' columns.

    A train image's features come from reference_features.parquet, whose rows follow the train manifest's;
    when that file is missing or does not match, its train images have none and are converted again.
    """
    found = []
    for split in SPLITS:
        manifest = folder / split / MANIFEST
        if not manifest.is_file():
            continue
        rows = pd.read_parquet(manifest)
        if not set(PROCESSED_MANIFEST_COLUMNS) <= set(rows.columns):  # written before recipes existed
            continue
        reference = folder / REFERENCE_FEATURES
        if split == "train" and reference.is_file():
            features = pd.read_parquet(reference, columns=list(IMAGE_FEATURES))
            if len(features) == len(rows):
                rows = pd.concat([rows, features], axis=1)
        found.append(rows.assign(split=split, path=[folder / split / name for name in rows["file"]]))
    columns = ["split", "id", "path", "recipe", *OUTPUT_TYPES]
    return pd.concat(found).reindex(columns=columns) if found else pd.DataFrame(columns=columns)


def reusable_outputs(plan: pd.DataFrame, previous: pd.DataFrame) -> pd.DataFrame:
    """The previous outputs that this run can link instead of convert, indexed by their row in `plan`:
    same split, id and recipe, a file whose bytes still have the recorded sha256, and (train) features."""
    matched = (plan[["id", "recipe"]].assign(split=plan["split"].astype(str)).reset_index()
               .merge(previous, on=["split", "id", "recipe"]).set_index("index"))
    intact = [file_sha256(path) == digest for path, digest in zip(matched["path"], matched["sha256"], strict=True)]
    featured = (matched["split"] != "train") | matched[list(IMAGE_FEATURES)].notna().all(axis=1)
    return matched[np.array(intact, dtype=bool) & featured.to_numpy()]


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs neither time nor space; copy where the filesystem cannot link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def conversion_jobs(plan: pd.DataFrame, params: PreprocessParams, paths: Paths, staging: Path) -> list[ImageJob]:
    sizes = target_sizes(params)
    return [
        ImageJob(paths.raw / relative, staging / split / name, sizes[split], params.resolution, centering)
        for relative, split, name, centering in zip(
            plan["path"], plan["split"], plan["file"], plan["centering"], strict=True)
    ]


def write_outputs(plan: pd.DataFrame, params: PreprocessParams, paths: Paths, staging: Path) -> pd.DataFrame:
    """Link what can be reused and convert the rest into `staging`; the plan with OUTPUT_TYPES' columns and
    `reused` (bool) added."""
    reused = reusable_outputs(plan, previous_outputs(paths.processed))
    for path, split, name in zip(reused["path"], reused["split"], plan.loc[reused.index, "file"], strict=True):
        link_or_copy(path, staging / split / name)
    todo = plan.index.difference(reused.index)
    converted = convert_all(conversion_jobs(plan.loc[todo], params, paths, staging), worker_count(params.workers))
    outputs = reused[list(OUTPUT_TYPES)].to_dict("index") | dict(zip(todo, converted, strict=True))
    columns = pd.DataFrame([outputs[index] for index in plan.index], index=plan.index, columns=list(OUTPUT_TYPES))
    return pd.concat([plan, columns.astype(OUTPUT_TYPES)], axis=1).assign(reused=plan.index.isin(reused.index))


def preprocess(params: PreprocessParams, paths: Paths) -> dict[str, int]:
    """Returns the images per split, how many were converted and reused, and how many train images were
    more elongated than the widest bucket (cropped into it, never dropped)."""
    plan = planned_manifest(params, paths)
    with atomic_dir(paths.processed) as staging:
        for split in SPLITS:
            (staging / split).mkdir()
        processed = write_outputs(plan, params, paths, staging)
        for split in SPLITS:
            rows = processed[processed["split"] == split]
            rows[list(PROCESSED_MANIFEST_COLUMNS)].to_parquet(staging / split / MANIFEST, index=False)
        save_reference(staging, processed[processed["split"] == "train"])
    counts = {split: int((processed["split"] == split).sum()) for split in SPLITS}
    counts.update(converted=int((~processed["reused"]).sum()), reused=int(processed["reused"].sum()),
                  beyond_widest_bucket=log_buckets(processed, params))
    log.info("preprocess: %d train, %d val at %d px (%s crop) with %d worker(s): %d converted, %d reused",
             counts["train"], counts["val"], params.resolution, params.crop, worker_count(params.workers),
             counts["converted"], counts["reused"])
    return counts


def log_buckets(processed: pd.DataFrame, params: PreprocessParams) -> int:
    """Log how the train images fill the buckets; returns how many were beyond the widest bucket."""
    if not params.bucketing:
        return 0
    train = processed[processed["split"] == "train"]
    buckets = target_sizes(params)["train"]
    sizes = zip(train["source_width"], train["source_height"], strict=True)
    beyond = sum(beyond_widest(size, buckets) for size in sizes)
    filled = train.groupby(["width", "height"]).size()
    log.info("preprocess: train images in %d of %d buckets (%s); %d more elongated than the widest bucket "
             "(preprocess.max_bucket_ratio %s) were cropped into it", len(filled), len(buckets),
             ", ".join(f"{width}x{height}: {count}" for (width, height), count in filled.items()), beyond,
             params.max_bucket_ratio)
    return beyond
