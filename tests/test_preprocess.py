import io
import json

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import Paths, PreprocessParams
from pipeline.ingest import MANIFEST, ingest
from pipeline.drift import FEATURES
from pipeline.preprocess import REFERENCE_FEATURES, STATS, load_split, preprocess, resize_and_crop, split_of, to_rgb
from pipeline.validate import validate


def test_split_is_deterministic_and_stable_under_growth():
    ids = [f"{i:064x}" for i in range(2000)]
    first = {i: split_of(i, 0.1) for i in ids}
    assert first == {i: split_of(i, 0.1) for i in reversed(ids)}
    share = sum(side == "val" for side in first.values()) / len(ids)
    assert 0.07 < share < 0.13


def test_transparency_is_composited_onto_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert to_rgb(Image.open(buffer)).size == (20, 40)


def test_resize_and_crop_makes_squares():
    assert resize_and_crop(Image.new("RGB", (100, 50)), 32).size == (32, 32)


def test_preprocess_writes_both_splits_and_reference_stats(tiny_params, tmp_path):
    paths = Paths(tmp_path)
    ingest(tiny_params.ingest, paths)
    validate(tiny_params.validate_, paths)
    counts = preprocess(PreprocessParams(resolution=16, val_fraction=0.2), paths)
    assert counts["train"] + counts["val"] == len(pd.read_parquet(paths.validated / MANIFEST))
    images, manifest = load_split(paths, "val")
    assert images.shape == (counts["val"], 16, 16, 3) and images.dtype == np.uint8
    assert list(manifest["file"]) == [f"{i}.png" for i in manifest["id"]]
    stats = json.loads((paths.processed / STATS).read_text())
    assert "circle" in stats["vocabulary"] and stats["count"] == counts["train"]
    features = pd.read_parquet(paths.processed / REFERENCE_FEATURES)
    assert list(features.columns) == list(FEATURES) and len(features) == counts["train"]
    assert (features["oov_rate"] == 0).all() and features["brightness"].between(0, 1).all()
