"""Mask files (preprocess.masks from a source's masks rather than alpha): a folder pairs `photo.png` with
`photo-masklabel.png`, a manifest names a mask per row (`ingest.manifest.mask_column`). Ingest keeps the mask
beside its image (a new mask, a new sample), rejects one of another size naming both, and preprocess crops it
exactly as its image, which keeps its own background (a mask weighs the loss; it does not cut the image out)."""

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.contracts.data import MANIFEST, MASK_SHA256, REJECTED, decode_png
from pipeline.contracts.paths import Paths
from pipeline.contracts.shards import MASK, read_shard
from pipeline.core.config import ConfigError
from pipeline.core.params_file import parse_params
from pipeline.stages.ingest import ingest
from pipeline.stages.inputs import source_fingerprint
from pipeline.stages.preprocess import preprocess
from pipeline.stages.validate import validate

from .conftest import merge, tiny_params_dict

SIZES = [(40, 24), (24, 56), (48, 48), (60, 30), (30, 40), (44, 32), (32, 64), (56, 40)]


def mask_pixels(seed: int, size: tuple[int, int]) -> np.ndarray:
    """Random 4x4 blocks of 0 and 255 (both present), at `size`."""
    blocks = np.random.default_rng(seed).integers(0, 2, (4, 4), dtype=np.uint8) * 255
    blocks[0, 0], blocks[-1, -1] = 255, 0
    return np.asarray(Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST))


def write_photo_and_mask(folder, name: str, seed: int, size: tuple[int, int]) -> None:
    """An opaque photo whose green channel is its mask and whose blue is the mask's inverse (so the background
    is blue, never white), and the mask file beside it."""
    mask = mask_pixels(seed, size)
    photo = np.stack([np.full_like(mask, 40), mask, 255 - mask], axis=-1)
    Image.fromarray(photo).save(folder / f"{name}.png")
    Image.fromarray(mask, "L").save(folder / f"{name}-masklabel.png")
    (folder / f"{name}.txt").write_text(f"a sks bag {seed}", encoding="utf-8")


def folder_of_masked_photos(root, sizes=SIZES):
    source = root / "source"
    source.mkdir(parents=True)
    for index, size in enumerate(sizes):
        write_photo_and_mask(source, f"{index}", index, size)
    return source


def project_params(source_settings: dict, **preprocess_settings):
    return parse_params(merge(tiny_params_dict(), {
        "ingest": source_settings,
        "validate": {"min_aspect_ratio": 0.2, "max_aspect_ratio": 5.0, "min_rows": 2, "max_bad_fraction": 0.5,
                     "max_brightness": 255, "near_duplicate_min_side": 1000},
        "preprocess": {"masks": True, "val_fraction": 0.2, **preprocess_settings},
    }))


def checksums(folder) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def processed_rows(paths: Paths) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(paths.processed / split / MANIFEST) for split in ("train", "val")])


def test_a_mask_file_is_cropped_exactly_as_its_image_which_keeps_its_background(tmp_path):
    """Random crops into buckets (test_masked_loss.py crops alpha masks the same way, square too)."""
    source = folder_of_masked_photos(tmp_path)
    before = checksums(source)
    params = project_params({"source": "folder", "folder": {"path": str(source)}}, bucketing=True, crop="random")
    paths = Paths(tmp_path / "project")
    result = ingest(params.ingest, paths)
    assert result.total == len(SIZES) and not result.rejected, "mask files are not images of their own"
    validate(params.validate_, paths)
    preprocess(params.preprocess, paths, params.ray)
    rows = processed_rows(paths)
    assert rows[MASK_SHA256].notna().all()
    for shard, members in rows.groupby("shard"):
        stored = read_shard(paths.processed / shard, ["image", MASK])
        for sample_id in members["id"]:
            image, mask = decode_png(stored.at[sample_id, "image"]), decode_png(stored.at[sample_id, MASK])
            assert mask.shape == image.shape[:2]
            # the green channel was the mask: the same crop and resampling keep them equal
            assert np.abs(image[..., 1].astype(int) - mask.astype(int)).max() <= 1, sample_id
            background = mask < 8
            assert background.any() and (image[background][:, 2] > 240).all(), "the background stays blue"
            assert (image[background][:, 0] < 60).all(), "not composited onto white"
    assert checksums(source) == before, "the source folder is only read"


def test_a_mask_of_another_size_is_rejected_naming_both_and_the_rest_go_on(tmp_path):
    source = folder_of_masked_photos(tmp_path, SIZES[:4])
    Image.fromarray(mask_pixels(9, (20, 20)), "L").save(source / "1-masklabel.png")
    (source / "2-masklabel.png").write_bytes(b"not a png")
    params = project_params({"source": "folder", "folder": {"path": str(source)}})
    paths = Paths(tmp_path / "project")
    result = ingest(params.ingest, paths)
    reasons = dict(pd.read_parquet(paths.raw / REJECTED).itertuples(index=False))
    assert reasons == {
        "1.png": "its mask file 1-masklabel.png is 20x20 pixels but the image is 24x56",
        "2.png": "its mask file 2-masklabel.png is not an image Pillow can open (UnidentifiedImageError)",
    }
    assert result.total == 2


def test_a_new_mask_is_a_new_sample_and_preprocess_converts_only_its_shard(tmp_path):
    source = folder_of_masked_photos(tmp_path)
    # one image a shard: what is converted again is then what changed
    params = project_params({"source": "folder", "folder": {"path": str(source)}, "shard_size": 1})
    paths = Paths(tmp_path / "project")
    fingerprint = source_fingerprint(params.ingest, paths)
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    preprocess(params.preprocess, paths, params.ray)
    first = processed_rows(paths).set_index("caption")

    Image.fromarray(255 - mask_pixels(3, SIZES[3]), "L").save(source / "3-masklabel.png")
    assert source_fingerprint(params.ingest, paths) != fingerprint, "DVC sees a changed mask file"
    result = ingest(params.ingest, paths)
    assert (result.new, result.unchanged, result.total) == (1, len(SIZES) - 1, len(SIZES))
    validate(params.validate_, paths)
    counts = preprocess(params.preprocess, paths, params.ray)
    assert counts["converted"] == 1
    second = processed_rows(paths).set_index("caption")
    changed = second.index[second["mask_sha256"] != first.loc[second.index, "mask_sha256"]].tolist()
    assert changed == ["a sks bag 3"]
    assert second.at["a sks bag 3", "id"] != first.at["a sks bag 3", "id"]


def test_a_manifest_names_each_rows_mask_and_a_missing_one_is_rejected_with_its_row(tmp_path):
    source = folder_of_masked_photos(tmp_path, SIZES[:4])
    pd.DataFrame({"path": ["0.png", "1.png", "2.png", "3.png"], "text": ["a", "b", "c", "d"],
                  "mask": ["0-masklabel.png", None, "gone.png", "3-masklabel.png"]}).to_csv(
        source / "list.csv", index=False)
    params = project_params({"source": "manifest", "manifest": {"path": str(source / "list.csv"),
                                                                "mask_column": "mask"}})
    paths = Paths(tmp_path / "project")
    result = ingest(params.ingest, paths)
    assert [(r.name, r.reason) for r in result.rejected] == [
        ("2.png", f"list.csv row 3: mask file not found: {source.resolve() / 'gone.png'}")]
    raw = pd.read_parquet(paths.raw / MANIFEST).set_index("caption")
    masks = pd.concat([read_shard(paths.raw / shard, [MASK]) for shard in raw["shard"].unique()])[MASK]
    assert masks[raw.at["b", "id"]] is None
    assert masks[raw.at["a", "id"]] == (source / "0-masklabel.png").read_bytes()


@pytest.mark.parametrize(("settings", "message"), [
    ({"folder": {"path": "x", "mask_suffix": ""}}, r"ingest\.folder\.mask_suffix"),
    ({"manifest": {"path": "x.csv", "mask_column": "mask"}}, None),
])
def test_mask_settings_are_validated(tmp_path, settings, message):
    source = next(iter(settings))
    overrides = {"ingest": {"source": source, **settings}}
    if message is None:
        assert parse_params(merge(tiny_params_dict(), overrides)).ingest.manifest.mask_column == "mask"
        return
    with pytest.raises(ConfigError, match=message):
        parse_params(merge(tiny_params_dict(), overrides))
