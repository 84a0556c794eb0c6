"""Stage `preprocess`: decode, orient, convert to 8-bit RGB, resize and crop, clean captions, split by id.

Writes data/processed/{train,val}/manifest.parquet, one row per image:
- id, caption: the normalised caption that encode, train and evaluate read;
- shard: the shard under data/processed/shards that holds the processed PNG (`pipeline.contracts.shards`);
- width, height: the processed image's size; crop: "center", or the crop position as the two fractions
  ImageOps.fit centres on ("0.123456,0.654321");
- original_width, original_height: the decoded, upright image's size before resizing; crop_left, crop_top:
  where the crop starts in the resized image (SDXL conditions on these, as its training scripts record them);
- recipe: a hash of everything that decides the processed image; sha256: the PNG's own hash;
- mask_sha256 (only with `preprocess.masks`): the hash of the image's mask (its mask file, which ingest keeps
  beside it, else its alpha channel) cropped and resized exactly as the image and kept as a greyscale PNG in the
  shard's `mask` column; null where the image has neither (train.masked_loss then weighs it 1 everywhere).
Beside them, reference_features.parquet and stats.json: the training set's drift features
(`pipeline.quality.drift`) per sample and summarised, for the monitoring flow.

Every image is a square at `resolution`, unless `preprocess.bucketing` is on: then each train image is
cropped to the aspect-ratio bucket (`pipeline.data.buckets`) nearest its own shape, and
`pipeline.contracts.data.load_split_groups` reads the split back one size at a time. Val images stay squares
at `resolution` always: evaluation compares them with the model's square generations.

Each data/raw shard's images of one split become one processed shard, named by their recipes; converting
runs on Ray (`pipeline.runtime.ray_tasks`), one task per shard, and a shard holds each image's size, hash and drift
features beside its PNG. A re-run converts only what is new: a shard the previous data/processed holds
under the same name is hard-linked into the new output, so adding images converts only their shards. The
outputs are the same as a run from scratch, however many Ray workers ran it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import PIL
from PIL import Image

from pipeline.contracts.data import MANIFEST, MASK_SHA256, REFERENCE_FEATURES, SPLITS, STATS, processed_columns
from pipeline.contracts.paths import Paths
from pipeline.contracts.shards import MASK, SHARDS_DIR, read_shard, shard_images, shard_masks, shard_name, write_shard
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.config import PreprocessParams, RayParams
from pipeline.data.buckets import Size, beyond_widest, bucket_sizes, nearest_bucket
from pipeline.data.captions import normalise_caption
from pipeline.data.images import CENTRE, alpha_mask, crop_top_left, file_mask, resize_and_crop, to_rgb
from pipeline.quality.drift_features import (
    IMAGE_FEATURES,
    combine_features,
    image_features,
    metadata_features,
    words_of,
)
from pipeline.runtime.ray_tasks import run_tasks

log = logging.getLogger(__name__)

# Bump whenever to_rgb, integer_to_grey, resize_and_crop or the PNG writing change what an image becomes:
# it is part of every recipe, so the next run converts everything again instead of reusing stale files.
CONVERSION_VERSION = "2"  # 2: shards record each image's original size and crop
# In the recipes of preprocess.masks runs only, so that turning masks on converts every shard once (with its masks)
# and a run without them keeps its recipes, shards and latents. Bump when alpha_mask or the mask's cropping change.
MASK_VERSION = "1"
# What converting an image yields, kept in its shard beside the PNG; image features only matter for train.
OUTPUT_TYPES = ({"width": "int64", "height": "int64", "sha256": "str"}
                | dict.fromkeys(("original_width", "original_height", "crop_left", "crop_top"), "int64")
                | dict.fromkeys(IMAGE_FEATURES, "float64"))


def output_types(masks: bool) -> dict[str, str]:
    """OUTPUT_TYPES, with the mask's hash where preprocess.masks keeps masks."""
    return OUTPUT_TYPES | ({MASK_SHA256: "str"} if masks else {})


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


def recipe_of(sample_id: str, resolution: int, sizes: tuple[Size, ...], centering: tuple[float, float],
              masks: bool = False) -> str:
    """A hash of everything that decides an image's processed file.

    The id is the source's content hash. The output size is the square, or whichever of the buckets the
    image's own aspect ratio picks: hashing the candidate sizes pins it without decoding the image first.
    Pillow's version is in as well: its resampling and PNG encoder write the bytes. With `masks` the shard
    holds each image's mask too (its alpha channel, or its mask file, which the id hashes: the id pins it).
    """
    described = dict(id=sample_id, resolution=resolution, sizes=[list(size) for size in sizes],
                     centering=list(centering), conversion=CONVERSION_VERSION, pillow=PIL.__version__)
    if masks:
        described["masks"] = MASK_VERSION
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ShardConversion:
    """A Ray task: convert these images of one data/raw shard into one processed shard."""

    source: Path  # the data/raw shard
    target: Path  # the processed shard, in the staging folder
    ids: tuple[str, ...]
    centerings: tuple[tuple[float, float], ...]
    sizes: tuple[Size, ...]  # the square, or the buckets each image's aspect ratio picks from
    resolution: int  # side of the square the drift features are measured on
    masks: bool = False  # preprocess.masks: keep each image's alpha channel as its mask


@dataclass(frozen=True)
class Converted:
    png: bytes
    size: Size
    original: Size  # the upright image's size before resizing
    crop: tuple[int, int]  # the crop's left and top in the resized image
    square: np.ndarray  # the image at `resolution`, which its drift features are measured on
    mask: bytes | None = None  # the mask as an "L" PNG of the processed image's size (preprocess.masks), if any


def png_bytes(image: Image.Image) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    return encoded.getvalue()


def convert_image(data: bytes, sizes: tuple[Size, ...], resolution: int, centering: tuple[float, float],
                  masks: bool = False, mask_file: bytes | None = None) -> Converted:
    """Convert, crop and encode one image as PNG; with its sizes, its crop and its square at `resolution`,
    which its drift features are measured on whatever its bucket, because monitoring measures new batches
    that way (`load_training_image`). With `masks`, its mask cropped to the same box: its mask file (ingest
    checked the size) if the source paired one with it, else its alpha channel, if it has one."""
    with Image.open(io.BytesIO(data)) as opened:
        image = to_rgb(opened)
        mask = (file_mask(mask_file) if mask_file is not None else alpha_mask(opened)) if masks else None
    size = nearest_bucket(image.size, sizes)
    processed = resize_and_crop(image, size, centering)
    square = (resolution, resolution)
    measured = processed if size == square else resize_and_crop(image, square, centering)
    kept_mask = None if mask is None else png_bytes(resize_and_crop(mask, size, centering))
    return Converted(png_bytes(processed), size, image.size, crop_top_left(image.size, size, centering),
                     np.asarray(measured), kept_mask)


def convert_shard(task: ShardConversion) -> list[dict]:
    """Convert one shard's images and write them as a processed shard, each with its size, sha256 and drift
    features; nothing to return (the shard holds the results)."""
    originals = shard_images(task.source)
    mask_files = shard_masks(task.source) if task.masks else pd.Series(dtype=object)
    converted = []
    for sample_id, centering in zip(task.ids, task.centerings, strict=True):
        try:
            converted.append(convert_image(originals[sample_id], task.sizes, task.resolution, centering,
                                           task.masks, mask_files.get(sample_id)))
        except Exception as error:  # any decoder or writer failure: the message must name the image
            problem = f"{type(error).__name__}: {error}"
            raise ValueError(f"preprocess: image {sample_id} of {task.source}: {problem}") from error
    columns = dict(width=[c.size[0] for c in converted], height=[c.size[1] for c in converted],
                   sha256=[hashlib.sha256(c.png).hexdigest() for c in converted],
                   original_width=[c.original[0] for c in converted], original_height=[c.original[1] for c in converted],
                   crop_left=[c.crop[0] for c in converted], crop_top=[c.crop[1] for c in converted])
    columns |= image_features(np.stack([c.square for c in converted])).to_dict("list")
    if task.masks:
        masks = [c.mask for c in converted]
        columns |= {MASK: pa.array(masks, pa.binary()),
                    MASK_SHA256: pa.array([None if m is None else hashlib.sha256(m).hexdigest() for m in masks],
                                          pa.string())}
    write_shard(task.target, task.ids, [c.png for c in converted], columns)
    return []


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
    """The validated rows with normalised captions, each with its split, crop, recipe and processed shard, in
    split then manifest order. The source image's size is renamed source_width/source_height: width and height name
    the processed size from here on."""
    manifest = pd.read_parquet(paths.validated / MANIFEST).rename(
        columns={"width": "source_width", "height": "source_height"})
    # plain lists: iterating pandas' Arrow-backed strings costs ~4 µs an element, seconds at 10^6 rows
    captions = manifest["caption"].tolist()
    manifest["caption"] = [normalise_caption(c, lowercase=params.lowercase_captions) for c in captions]
    manifest["split"] = pd.Categorical([split_of(i, params.val_fraction) for i in manifest["id"].tolist()], SPLITS)
    counts = manifest["split"].value_counts()
    if not counts["train"] or not counts["val"]:
        raise ValueError(
            f"preprocess: the split left {counts['train']} train and {counts['val']} val samples; "
            "both need at least one (add data or change preprocess.val_fraction)"
        )
    manifest = manifest.sort_values("split", kind="stable").reset_index(drop=True)
    sizes = target_sizes(params)
    ids = manifest["id"].tolist()
    manifest["centering"] = [crop_centering(i, params.crop, params.seed) for i in ids]
    manifest["crop"] = [crop_label(centering) for centering in manifest["centering"]]
    manifest["recipe"] = [recipe_of(i, params.resolution, sizes[split], centering, params.masks)
                          for i, split, centering
                          in zip(ids, manifest["split"].tolist(), manifest["centering"], strict=True)]
    return with_shards(manifest)


def with_shards(plan: pd.DataFrame) -> pd.DataFrame:
    """The plan with each row's processed shard (the raw one moves to `raw_shard`): one per data/raw shard
    and split, named by its rows' recipes, so it keeps its name while they do not change."""
    names = pd.Series(index=plan.index, dtype=object)
    for (_, split), rows in plan.groupby(["shard", "split"], sort=False, observed=True):
        names[rows.index] = shard_name(split, rows["recipe"])
    return plan.assign(raw_shard=plan["shard"], shard=names)


def conversions(plan: pd.DataFrame, params: PreprocessParams, paths: Paths, staging: Path) -> list[ShardConversion]:
    sizes = target_sizes(params)
    return [ShardConversion(paths.raw / rows["raw_shard"].iat[0], staging / shard, tuple(rows["id"]),
                            tuple(rows["centering"]), sizes[rows["split"].iat[0]], params.resolution, params.masks)
            for shard, rows in plan.groupby("shard", sort=False)]


def holds_exactly(shard: Path, ids: pd.Series) -> bool:
    """Whether a previous shard is there, readable and holds these images (reading its ids only)."""
    try:
        return read_shard(shard, ["id"]).index.tolist() == ids.tolist()
    except (OSError, ValueError):
        return False


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs neither time nor space; copy where the filesystem cannot link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_outputs(plan: pd.DataFrame, params: PreprocessParams, ray: RayParams, paths: Paths,
                  staging: Path) -> pd.DataFrame:
    """Link the shards the previous run wrote under the same names and convert the rest into `staging`; the
    plan with output_types' columns (read back from the shards) and `reused` (bool) added."""
    (staging / SHARDS_DIR).mkdir()
    reused = {shard for shard, rows in plan.groupby("shard", sort=False)
              if holds_exactly(paths.processed / shard, rows["id"])}
    for shard in reused:
        link_or_copy(paths.processed / shard, staging / shard)
    todo = plan[~plan["shard"].isin(reused)]
    run_tasks(convert_shard, conversions(todo, params, paths, staging), ray, "preprocess")
    types = output_types(params.masks)
    outputs = pd.concat([read_shard(staging / shard, list(types)).assign(shard=shard)
                         for shard in plan["shard"].unique()])
    columns = plan[["id", "shard"]].merge(outputs.reset_index(), on=["id", "shard"], how="left")
    columns.index = plan.index
    return pd.concat([plan, columns[list(types)].astype(types)], axis=1).assign(
        reused=plan["shard"].isin(reused))


def preprocess(params: PreprocessParams, paths: Paths, ray: RayParams = RayParams()) -> dict[str, int]:
    """Returns the images per split, how many were converted and reused, and how many train images were
    more elongated than the widest bucket (cropped into it, never dropped)."""
    plan = planned_manifest(params, paths)
    with atomic_dir(paths.processed) as staging:
        for split in SPLITS:
            (staging / split).mkdir()
        processed = write_outputs(plan, params, ray, paths, staging)
        for split in SPLITS:
            rows = processed[processed["split"] == split]
            rows[list(processed_columns(params.masks))].to_parquet(staging / split / MANIFEST, index=False)
        save_reference(staging, processed[processed["split"] == "train"])
    counts = {split: int((processed["split"] == split).sum()) for split in SPLITS}
    counts.update(converted=int((~processed["reused"]).sum()), reused=int(processed["reused"].sum()),
                  beyond_widest_bucket=log_buckets(processed, params))
    log.info("preprocess: %d train, %d val at %d px (%s crop): %d converted, %d reused",
             counts["train"], counts["val"], params.resolution, params.crop, counts["converted"], counts["reused"])
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
