"""Stage `preprocess`: decode, orient, convert to 8-bit RGB, resize and crop, clean captions, split by id.

Writes data/processed/{train,val}/<id>.png with a manifest.parquet each (id, file, caption: the
normalised caption that encode, train and evaluate read), and data/processed/reference_features.parquet
and stats.json: the training set's drift features (`pipeline.drift`) per sample and summarised, for the
monitoring flow. Images are converted by a pool of `preprocess.workers` processes; the outputs do not
depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import unicodedata
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipeline.atomic import atomic_dir, write_json
from pipeline.config import Paths, PreprocessParams
from pipeline.drift import combine_features, image_features, metadata_features, words_of
from pipeline.ingest import MANIFEST

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
STATS = "stats.json"
REFERENCE_FEATURES = "reference_features.parquet"
WHITE = (255, 255, 255)
CENTRE = (0.5, 0.5)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
CHUNKS_PER_WORKER = 8  # small enough to balance uneven images, large enough to amortise the hand-over


def split_of(sample_id: str, val_fraction: float) -> str:
    """Deterministic and stable as data is added: a sample's side depends on its id alone."""
    bucket = int(hashlib.sha256(f"split:{sample_id}".encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "val" if bucket < val_fraction else "train"


def normalise_caption(caption: str, *, lowercase: bool = False) -> str:
    """Unicode NFC (so "é" typed two ways is one token), whitespace runs collapsed to one space, stripped."""
    text = " ".join(unicodedata.normalize("NFC", caption).split())
    return text.lower() if lowercase else text


def integer_to_grey(image: Image.Image) -> Image.Image:
    """8-bit grey from Pillow's integer modes, scaled rather than clipped (convert() clips at 255).

    16-bit samples (I;16*, and 16-bit files Pillow decodes as I) are divided by 257, so 65535 -> 255;
    anything outside the 16-bit range is stretched from its own minimum to its maximum.
    """
    values = np.asarray(image).astype(np.float64)
    low, high = values.min(), values.max()
    if image.mode in SIXTEEN_BIT_MODES or (low >= 0 and high <= 0xFFFF):
        low, high = 0.0, float(0xFFFF)
    scaled = (values - low) * 255.0 / max(high - low, 1.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def onto_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, WHITE)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def to_rgb(image: Image.Image) -> Image.Image:
    """Respect EXIF orientation, composite transparency onto white, and return 8-bit RGB.

    Handles 1, L, P (with or without transparency), LA, PA, RGBA, CMYK and 16/32-bit integer images.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        image = integer_to_grey(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return onto_white(image)
    return image.convert("RGB")


def crop_centering(sample_id: str, crop: str, seed: int) -> tuple[float, float]:
    """Where to crop, as ImageOps.fit's fractions: the centre, or a position fixed by the id and seed."""
    if crop == "center":
        return CENTRE
    digest = hashlib.sha256(f"crop:{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:4]) / 0xFFFF_FFFF, int.from_bytes(digest[4:8]) / 0xFFFF_FFFF


def crop_label(centering: tuple[float, float]) -> str:
    return "center" if centering == CENTRE else f"{centering[0]:.6f},{centering[1]:.6f}"


def resize_and_crop(image: Image.Image, resolution: int, centering: tuple[float, float] = CENTRE) -> Image.Image:
    """Scale the shorter side to `resolution`, then take the square at `centering` (the centre by default)."""
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS, centering=centering)


def load_training_image(path: Path, resolution: int, centering: tuple[float, float] = CENTRE) -> Image.Image:
    with Image.open(path) as image:
        return resize_and_crop(to_rgb(image), resolution, centering)


@dataclass(frozen=True)
class ImageJob:
    """One image for a worker: where to read it, where to write it, and how to crop it."""

    source: Path
    target: Path
    resolution: int
    centering: tuple[float, float]


def convert_image(job: ImageJob) -> dict[str, float]:
    """Load, convert, crop and write one image; return its drift image features for the reference."""
    try:
        image = load_training_image(job.source, job.resolution, job.centering)
        image.save(job.target, format="PNG")
    except Exception as error:  # any decoder or writer failure: the message must name the file
        raise ValueError(f"preprocess: {job.source}: {type(error).__name__}: {error}") from error
    return image_features(np.asarray(image)[None]).to_dict("records")[0]


def worker_count(workers: int | None) -> int:
    return workers or os.cpu_count() or 1


def convert_all(jobs: list[ImageJob], workers: int) -> list[dict[str, float]]:
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


def save_reference(folder: Path, image_rows: Iterable[dict[str, float]], rows: pd.DataFrame) -> None:
    """The training set's per-sample drift features and their summary, for the monitoring flow."""
    captions = rows["caption"].tolist()
    vocabulary = {word for caption in captions for word in words_of(caption)}
    sizes = list(zip(rows["width"], rows["height"], strict=True))
    features = combine_features(pd.DataFrame(list(image_rows)), metadata_features(sizes, captions, vocabulary))
    features.to_parquet(folder / REFERENCE_FEATURES, index=False)
    write_json(folder / STATS, reference_stats(features, vocabulary))


def planned_manifest(params: PreprocessParams, paths: Paths) -> pd.DataFrame:
    """The validated rows with normalised captions, each with its split, in split then manifest order."""
    manifest = pd.read_parquet(paths.validated / MANIFEST)
    manifest["caption"] = [normalise_caption(c, lowercase=params.lowercase_captions) for c in manifest["caption"]]
    manifest["split"] = pd.Categorical([split_of(i, params.val_fraction) for i in manifest["id"]], SPLITS)
    manifest["file"] = manifest["id"] + ".png"
    manifest["width"] = manifest["height"] = params.resolution
    manifest["crop"] = [crop_label(crop_centering(i, params.crop, params.seed)) for i in manifest["id"]]
    counts = manifest["split"].value_counts()
    if not counts["train"] or not counts["val"]:
        raise ValueError(
            f"preprocess: the split left {counts['train']} train and {counts['val']} val samples; "
            "both need at least one (add data or change preprocess.val_fraction)"
        )
    return manifest.sort_values("split", kind="stable").reset_index(drop=True)


def preprocess(params: PreprocessParams, paths: Paths) -> dict[str, int]:
    manifest = planned_manifest(params, paths)
    workers = worker_count(params.workers)
    with atomic_dir(paths.processed) as staging:
        for split in SPLITS:
            (staging / split).mkdir()
        jobs = [
            ImageJob(paths.raw / relative, staging / split / name, params.resolution,
                     crop_centering(sample_id, params.crop, params.seed))
            for sample_id, relative, split, name in zip(
                manifest["id"], manifest["path"], manifest["split"], manifest["file"], strict=True)
        ]
        image_rows = convert_all(jobs, workers)
        for split in SPLITS:
            rows = manifest[manifest["split"] == split]
            rows[["id", "file", "caption", "width", "height", "crop"]].to_parquet(staging / split / MANIFEST, index=False)
        is_train = (manifest["split"] == "train").to_numpy()
        save_reference(staging, [row for row, train in zip(image_rows, is_train, strict=True) if train],
                       manifest[is_train])
    counts = {split: int((manifest["split"] == split).sum()) for split in SPLITS}
    log.info("preprocess: %d train, %d val at %d px (%s crop) with %d worker(s)",
             counts["train"], counts["val"], params.resolution, params.crop, workers)
    return counts


def load_split(paths: Paths, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    """All images of a processed split as uint8 NHWC, with their manifest rows in the same order."""
    manifest = pd.read_parquet(paths.processed / split / MANIFEST)
    images = np.stack([np.asarray(Image.open(paths.processed / split / name)) for name in manifest["file"]])
    return images, manifest


def load_split_groups(paths: Paths, split: str) -> list[tuple[np.ndarray, pd.DataFrame]]:
    """A split's images grouped by size (height, width) as uint8 NHWC, each with its manifest rows."""
    manifest = pd.read_parquet(paths.processed / split / MANIFEST)
    return [
        (np.stack([np.asarray(Image.open(paths.processed / split / name)) for name in rows["file"]]), rows)
        for _, rows in manifest.groupby(["height", "width"], sort=True)
    ]
