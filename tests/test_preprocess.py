import io
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.config import ConfigError, Paths, PreprocessParams, parse_params
from pipeline.ingest import MANIFEST, ingest
from pipeline.drift import FEATURES
from pipeline.preprocess import (
    REFERENCE_FEATURES, STATS, crop_centering, load_split, normalise_caption, preprocess, resize_and_crop, split_of, to_rgb,
)
from pipeline.validate import validate

from .conftest import REPO, tree_hashes


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


def test_sixteen_bit_grey_is_scaled_not_clipped():
    image = Image.new("I;16", (2, 1))
    image.putpixel((0, 0), 65535)
    image.putpixel((1, 0), 32896)  # 128 * 257
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (128, 128, 128)


def test_sixteen_bit_png_read_back_is_scaled():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 257 * 64, 65535]], dtype=np.uint16)).save(buffer, format="PNG")
    assert [to_rgb(Image.open(buffer)).getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (64,) * 3, (255,) * 3]


def test_32_bit_integers_are_stretched_over_their_range():
    image = Image.fromarray(np.array([[-100_000, 0, 100_000]], dtype=np.int32))
    assert image.mode == "I"
    assert [to_rgb(image).getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]


def test_cmyk_becomes_rgb():
    image = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert to_rgb(image).getpixel((0, 0)) == (255, 0, 0)


def test_palette_transparency_is_composited_onto_white():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # index 0 (red) is transparent
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (0, 0, 255)


def test_opaque_palette_keeps_its_colours():
    image = Image.new("P", (1, 1))
    image.putpalette([10, 200, 30] + [0] * 765)
    assert to_rgb(image).getpixel((0, 0)) == (10, 200, 30)


def test_grey_with_alpha_is_composited_onto_white():
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (40, 255))
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (40, 40, 40)


def test_grey_and_bilevel_become_rgb():
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert [to_rgb(bilevel).getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


def test_captions_are_normalised():
    decomposed = "a  cafe\u0301\u00a0 au\tlait \n"
    assert normalise_caption(decomposed) == "a caf\u00e9 au lait"
    assert normalise_caption("A Red  Circle", lowercase=True) == "a red circle"
    assert normalise_caption("A Red Circle") == "A Red Circle"


def test_random_crop_is_fixed_by_id_and_seed():
    assert crop_centering("abc", "center", 0) == (0.5, 0.5)
    first = crop_centering("abc", "random", 0)
    assert first == crop_centering("abc", "random", 0)
    assert first != crop_centering("abd", "random", 0) and first != crop_centering("abc", "random", 1)
    assert all(0 <= fraction <= 1 for fraction in first)


def test_random_crop_moves_along_the_longer_side():
    stripes = Image.fromarray(np.repeat(np.arange(0, 250, 10, dtype=np.uint8)[None, :, None], 3, axis=2).repeat(10, 0))
    left = resize_and_crop(stripes, 10, (0.0, 0.5))
    right = resize_and_crop(stripes, 10, (1.0, 0.5))
    assert np.asarray(left).mean() < np.asarray(right).mean()


def _prepared_project(params, root):
    paths = Paths(root)
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    return paths


def test_outputs_do_not_depend_on_the_number_of_workers(tiny_params, tmp_path):
    paths = _prepared_project(tiny_params, tmp_path)
    settings = dict(resolution=16, val_fraction=0.2, crop="random", seed=3, lowercase_captions=True)
    preprocess(PreprocessParams(**settings, workers=1), paths)
    single = tree_hashes(paths.processed)
    preprocess(PreprocessParams(**settings, workers=2), paths)
    assert tree_hashes(paths.processed) == single


def test_processed_manifest_carries_normalised_captions(tiny_params, tmp_path):
    paths = _prepared_project(tiny_params, tmp_path)
    validated = pd.read_parquet(paths.validated / MANIFEST)
    validated["caption"] = "  A   RED circle "
    validated.to_parquet(paths.validated / MANIFEST, index=False)
    preprocess(PreprocessParams(resolution=16, val_fraction=0.2, lowercase_captions=True, workers=1), paths)
    for split in ("train", "val"):
        assert set(pd.read_parquet(paths.processed / split / MANIFEST)["caption"]) == {"a red circle"}
    assert json.loads((paths.processed / STATS).read_text())["vocabulary"] == ["a", "circle", "red"]


def test_an_undecodable_image_is_named_and_nothing_is_written(tiny_params, tmp_path):
    paths = _prepared_project(tiny_params, tmp_path)
    broken = paths.raw / pd.read_parquet(paths.validated / MANIFEST)["path"].iloc[5]
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        preprocess(PreprocessParams(resolution=16, workers=2), paths)
    assert not paths.processed.exists()


def test_dvc_reruns_preprocess_for_every_setting_but_workers():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["preprocess"]
    assert set(stage["params"]) == {f"preprocess.{key}" for key in PreprocessParams.model_fields} - {"preprocess.workers"}


def test_bad_preprocess_settings_name_their_key():
    with pytest.raises(ConfigError, match=r"preprocess\.crop: "):
        parse_params({"preprocess": {"crop": "left"}})
    with pytest.raises(ConfigError, match=r"preprocess\.workers: "):
        parse_params({"preprocess": {"workers": -1}})
