"""Stage `preprocess`: decode, orient, convert to RGB, resize and crop, split train/val by id.

Writes data/processed/{train,val}/<id>.png with a manifest.parquet each (id, file, caption), and
data/processed/reference_features.parquet and stats.json: the training set's drift features
(`pipeline.drift`) per sample and summarised, for the monitoring flow.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipeline.atomic import atomic_dir, write_json
from pipeline.config import Paths, PreprocessParams
from pipeline.drift import feature_table, words_of
from pipeline.ingest import MANIFEST

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
STATS = "stats.json"
REFERENCE_FEATURES = "reference_features.parquet"
WHITE = (255, 255, 255)


def split_of(sample_id: str, val_fraction: float) -> str:
    """Deterministic and stable as data is added: a sample's side depends on its id alone."""
    bucket = int(hashlib.sha256(f"split:{sample_id}".encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "val" if bucket < val_fraction else "train"


def to_rgb(image: Image.Image) -> Image.Image:
    """Respect EXIF orientation, composite transparency onto white, and return 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to `resolution`, then take the centre square."""
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def load_training_image(path: Path, resolution: int) -> Image.Image:
    with Image.open(path) as image:
        return resize_and_crop(to_rgb(image), resolution)


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


def save_reference(folder: Path, images: list[np.ndarray], rows: pd.DataFrame) -> None:
    """The training set's per-sample drift features and their summary, for the monitoring flow."""
    captions = rows["caption"].tolist()
    vocabulary = {word for caption in captions for word in words_of(caption)}
    sizes = list(zip(rows["width"], rows["height"], strict=True))
    features = feature_table(np.stack(images), sizes, captions, vocabulary)
    features.to_parquet(folder / REFERENCE_FEATURES, index=False)
    write_json(folder / STATS, reference_stats(features, vocabulary))


def preprocess(params: PreprocessParams, paths: Paths) -> dict[str, int]:
    manifest = pd.read_parquet(paths.validated / MANIFEST)
    manifest["split"] = [split_of(sample_id, params.val_fraction) for sample_id in manifest["id"]]
    counts: dict[str, int] = {}
    with atomic_dir(paths.processed) as staging:
        train_pixels: list[np.ndarray] = []
        for split in SPLITS:
            rows = manifest[manifest["split"] == split]
            (staging / split).mkdir()
            files = []
            for sample_id, relative in zip(rows["id"], rows["path"], strict=True):
                image = load_training_image(paths.raw / relative, params.resolution)
                name = f"{sample_id}.png"
                image.save(staging / split / name)
                files.append(name)
                if split == "train":
                    train_pixels.append(np.asarray(image))
            pd.DataFrame({"id": rows["id"], "file": files, "caption": rows["caption"]}).to_parquet(
                staging / split / MANIFEST, index=False
            )
            counts[split] = len(rows)
        if not counts["train"] or not counts["val"]:
            raise ValueError(
                f"preprocess: the split left {counts['train']} train and {counts['val']} val samples; "
                "both need at least one (add data or change preprocess.val_fraction)"
            )
        save_reference(staging, train_pixels, manifest[manifest["split"] == "train"])
    log.info("preprocess: %d train, %d val at %d px", counts["train"], counts["val"], params.resolution)
    return counts


def load_split(paths: Paths, split: str) -> tuple[np.ndarray, pd.DataFrame]:
    """All images of a processed split as uint8 NHWC, with their manifest rows in the same order."""
    manifest = pd.read_parquet(paths.processed / split / MANIFEST)
    images = np.stack([np.asarray(Image.open(paths.processed / split / name)) for name in manifest["file"]])
    return images, manifest
