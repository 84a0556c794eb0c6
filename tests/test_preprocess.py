import io
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.contracts.data import MANIFEST, REFERENCE_FEATURES, STATS, decode_png, load_split, load_split_groups
from pipeline.contracts.paths import Paths
from pipeline.contracts.shards import SHARDS_DIR, image_bytes, read_shard, write_shard
from pipeline.core.config import ConfigError, PreprocessParams, RayParams
from pipeline.core.params_file import parse_params
from pipeline.data.buckets import bucket_sizes
from pipeline.data.captions import normalise_caption
from pipeline.data.images import load_training_image, resize_and_crop, to_rgb
from pipeline.quality.drift_features import FEATURES
from pipeline.stages.ingest import ingest
from pipeline.stages.preprocess import crop_centering, preprocess, split_of
from pipeline.stages.validate import validate

from .conftest import REPO, add_patterns, another_ray, folder_project, tree_hashes


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


def test_resize_and_crop_makes_the_size_asked_for():
    assert resize_and_crop(Image.new("RGB", (100, 50)), (32, 32)).size == (32, 32)
    assert resize_and_crop(Image.new("RGB", (100, 50)), (40, 24)).size == (40, 24)


def test_preprocess_writes_both_splits_and_reference_stats(tiny_params, tmp_path):
    paths = Paths(tmp_path)
    ingest(tiny_params.ingest, paths)
    validate(tiny_params.validate_, paths)
    counts = preprocess(PreprocessParams(resolution=16, val_fraction=0.2), paths)
    assert counts["train"] + counts["val"] == len(pd.read_parquet(paths.validated / MANIFEST))
    images, manifest = load_split(paths, "val")
    assert images.shape == (counts["val"], 16, 16, 3) and images.dtype == np.uint8
    for shard, rows in manifest.groupby("shard"):
        assert read_shard(paths.processed / shard, ["id"]).index.tolist() == rows["id"].tolist()
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
    left = resize_and_crop(stripes, (10, 10), (0.0, 0.5))
    right = resize_and_crop(stripes, (10, 10), (1.0, 0.5))
    assert np.asarray(left).mean() < np.asarray(right).mean()


def _prepared_project(params, root):
    paths = Paths(root)
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    return paths


def test_outputs_do_not_depend_on_the_number_of_ray_workers(tiny_params, tmp_path):
    paths = _prepared_project(tiny_params.model_copy(update={"ingest": tiny_params.ingest.model_copy(
        update={"shard_size": 40})}), tmp_path)
    params = PreprocessParams(resolution=16, val_fraction=0.2, crop="random", seed=3, lowercase_captions=True)
    outputs = []
    for cpus in (1, 2):
        with another_ray(RayParams(num_cpus=cpus)):
            preprocess(params, paths)
        outputs.append(tree_hashes(paths.processed))
        shutil.rmtree(paths.processed)  # or the second run would reuse every shard instead of converting it
    assert outputs[0] == outputs[1] and len(outputs[0]) > 8, "four raw shards, two splits each"


def test_processed_manifest_carries_normalised_captions(tiny_params, tmp_path):
    paths = _prepared_project(tiny_params, tmp_path)
    validated = pd.read_parquet(paths.validated / MANIFEST)
    validated["caption"] = "  A   RED circle "
    validated.to_parquet(paths.validated / MANIFEST, index=False)
    preprocess(PreprocessParams(resolution=16, val_fraction=0.2, lowercase_captions=True), paths)
    for split in ("train", "val"):
        assert set(pd.read_parquet(paths.processed / split / MANIFEST)["caption"]) == {"a red circle"}
    assert json.loads((paths.processed / STATS).read_text())["vocabulary"] == ["a", "circle", "red"]


def test_an_undecodable_image_is_named_and_nothing_is_written(tiny_params, tmp_path):
    paths = _prepared_project(tiny_params, tmp_path)
    validated = pd.read_parquet(paths.validated / MANIFEST)
    broken = validated["id"].iloc[5]
    write_shard(paths.raw / SHARDS_DIR / "broken.parquet", [broken], [b"not an image"])
    validated.loc[5, "shard"] = f"{SHARDS_DIR}/broken.parquet"
    validated.to_parquet(paths.validated / MANIFEST, index=False)
    with pytest.raises(ValueError, match=f"image {broken} of {re.escape(str(paths.raw / SHARDS_DIR / 'broken.parquet'))}"):
        preprocess(PreprocessParams(resolution=16), paths)
    assert not paths.processed.exists()


def test_dvc_reruns_preprocess_for_every_setting_and_keeps_the_previous_output():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["preprocess"]
    assert set(stage["params"]) == {f"preprocess.{key}" for key in PreprocessParams.model_fields}
    assert {"data/processed": {"persist": True}} in stage["outs"]


def test_bad_preprocess_settings_name_their_key():
    with pytest.raises(ConfigError, match=r"preprocess\.crop: "):
        parse_params({"preprocess": {"crop": "left"}})
    with pytest.raises(ConfigError, match=r"preprocess\.bucket_step: .*multiple of 8"):
        parse_params({"preprocess": {"bucket_step": 12}})
    with pytest.raises(ConfigError, match=r"preprocess\.bucket_step: .*must divide preprocess\.resolution"):
        parse_params({"preprocess": {"bucketing": True, "bucket_step": 64}})
    with pytest.raises(ConfigError, match=r"preprocess\.max_bucket_ratio: "):
        parse_params({"preprocess": {"max_bucket_ratio": 0.5}})


# Incremental runs

SMALL = [(24, 20)] * 30


def _a_run_from_scratch(paths: Paths, params: PreprocessParams, root) -> dict[str, str]:
    """The processed tree a fresh folder with the same raw and validated data gets."""
    fresh = Paths(root)
    shutil.copytree(paths.raw, fresh.raw)
    shutil.copytree(paths.validated, fresh.validated)
    preprocess(params, fresh)
    return tree_hashes(fresh.processed)


def test_a_rerun_converts_only_new_images_and_ends_as_a_run_from_scratch(tmp_path):
    params, paths = folder_project(tmp_path, SMALL, val_fraction=0.2, crop="random", seed=5)
    first = preprocess(params.preprocess, paths)
    assert (first["converted"], first["reused"]) == (30, 0)
    add_patterns(tmp_path / "source", [(24, 20)] * 10, first_seed=30)
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    again = preprocess(params.preprocess, paths)
    assert (again["converted"], again["reused"]) == (10, 30)
    assert tree_hashes(paths.processed) == _a_run_from_scratch(paths, params.preprocess, tmp_path / "fresh")


def stored_ids(paths: Paths) -> set[str]:
    return {i for shard in (paths.processed / SHARDS_DIR).iterdir() for i in read_shard(shard, ["id"]).index}


def test_images_no_longer_validated_disappear(tmp_path):
    params, paths = folder_project(tmp_path, SMALL, val_fraction=0.2)
    preprocess(params.preprocess, paths)
    validated = pd.read_parquet(paths.validated / MANIFEST)
    validated.iloc[3:].to_parquet(paths.validated / MANIFEST, index=False)
    counts = preprocess(params.preprocess, paths)
    assert counts["converted"] + counts["reused"] == 27 and counts["converted"] > 0, "their shards are written anew"
    assert stored_ids(paths) == set(validated["id"].iloc[3:])


def test_a_new_resolution_converts_everything(tmp_path):
    params, paths = folder_project(tmp_path, SMALL, val_fraction=0.2)
    preprocess(params.preprocess, paths)
    counts = preprocess(params.preprocess.model_copy(update={"resolution": 24}), paths)
    assert (counts["converted"], counts["reused"]) == (30, 0)
    assert load_split(paths, "val")[0].shape[1:] == (24, 24, 3)


def test_a_damaged_previous_output_is_converted_again(tmp_path):
    params, paths = folder_project(tmp_path, SMALL, val_fraction=0.2)
    preprocess(params.preprocess, paths)
    before = tree_hashes(paths.processed)
    train_shard, val_shard = (paths.processed / pd.read_parquet(paths.processed / split / MANIFEST)["shard"][0]
                              for split in ("train", "val"))
    train_shard.unlink()
    val_shard.write_bytes(b"")
    counts = preprocess(params.preprocess, paths)
    assert (counts["converted"], counts["reused"]) == (30, 0)
    assert tree_hashes(paths.processed) == before


def test_reference_features_lost_are_rebuilt_from_the_shards(tmp_path):
    params, paths = folder_project(tmp_path, SMALL, val_fraction=0.2)
    preprocess(params.preprocess, paths)
    before = tree_hashes(paths.processed)
    (paths.processed / REFERENCE_FEATURES).unlink()
    counts = preprocess(params.preprocess, paths)
    assert (counts["converted"], counts["reused"]) == (0, 30)
    assert tree_hashes(paths.processed) == before


# Aspect-ratio bucketing

MIXED = [(24, 20), (40, 20), (20, 40), (30, 40), (48, 24), (24, 48), (32, 32), (64, 20), (200, 20), (20, 200)] * 3


def test_bucketing_off_gives_the_squares_of_load_training_image(tmp_path):
    params, paths = folder_project(tmp_path, MIXED, val_fraction=0.2, crop="random", seed=1)
    counts = preprocess(params.preprocess, paths)
    assert counts["beyond_widest_bucket"] == 0
    validated = pd.read_parquet(paths.validated / MANIFEST)
    raw = dict(zip(validated["id"], image_bytes(paths.raw, validated), strict=True))
    for split in ("train", "val"):
        images, manifest = load_split(paths, split)
        assert (manifest["width"] == 32).all() and (manifest["height"] == 32).all()
        for pixels, sample_id, crop in zip(images, manifest["id"], manifest["crop"], strict=True):
            centering = crop_centering(sample_id, "random", 1)
            assert crop == f"{centering[0]:.6f},{centering[1]:.6f}"
            assert np.array_equal(pixels, np.asarray(load_training_image(io.BytesIO(raw[sample_id]), 32, centering)))


def test_bucketed_train_images_keep_their_shape_and_val_stays_square(tmp_path):
    params, paths = folder_project(tmp_path, MIXED, val_fraction=0.2, bucketing=True)
    counts = preprocess(params.preprocess, paths)
    buckets = bucket_sizes(32, 8, 2.0)
    train = pd.read_parquet(paths.processed / "train" / MANIFEST)
    assert set(zip(train["width"], train["height"])) <= set(buckets) and (train["crop"] == "center").all()
    source = pd.read_parquet(paths.validated / MANIFEST).set_index("id").loc[train["id"]]
    shapes = list(zip(source["width"], source["height"], train["width"], train["height"], strict=True))
    assert {(w, h) for sw, sh, w, h in shapes if sw == 2 * sh} == {(32, 16)}
    # 10:1 and 1:10 are kept, in the most elongated buckets, and counted
    assert {(w, h) for sw, sh, w, h in shapes if sw == 10 * sh} == {(32, 16)}
    assert {(w, h) for sw, sh, w, h in shapes if sh == 10 * sw} == {(16, 32)}
    elongated = sum(max(sw, sh) > 2 * min(sw, sh) for sw, sh, _, _ in shapes)  # 64x20 and the 10:1 ones
    assert counts["beyond_widest_bucket"] == elongated > 0
    val_images, val = load_split(paths, "val")
    assert val_images.shape[1:] == (32, 32, 3) and (val["width"] == 32).all() and (val["height"] == 32).all()
    assert len(pd.read_parquet(paths.processed / REFERENCE_FEATURES)) == counts["train"]


def test_load_split_groups_groups_a_bucketed_split_by_size(tmp_path):
    params, paths = folder_project(tmp_path, MIXED, val_fraction=0.2, bucketing=True)
    preprocess(params.preprocess, paths)
    manifest = pd.read_parquet(paths.processed / "train" / MANIFEST)
    groups = load_split_groups(paths, "train")
    sizes = [(rows["height"].iloc[0], rows["width"].iloc[0]) for _, rows in groups]
    assert sizes == sorted(set(zip(manifest["height"], manifest["width"]))) and len(sizes) > 1
    for (height, width), (images, rows) in zip(sizes, groups, strict=True):
        assert images.dtype == np.uint8 and images.shape == (len(rows), height, width, 3)
        assert list(rows.index) == list(range(len(rows)))
        same_size = manifest[(manifest["height"] == height) & (manifest["width"] == width)]
        assert list(rows["id"]) == list(same_size["id"]), "manifest order within a group"
        assert np.array_equal(images[-1], decode_png(image_bytes(paths.processed, rows.iloc[[-1]])[0]))
    assert sum(len(rows) for _, rows in groups) == len(manifest)
    with pytest.raises(ValueError, match=r"train split holds images of \d+ sizes .*load_split_groups"):
        load_split(paths, "train")
    assert len(load_split_groups(paths, "val")) == 1
