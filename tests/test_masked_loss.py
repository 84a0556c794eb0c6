"""Masked loss (train.masked_loss, preprocess.masks): an image's alpha channel becomes its mask, cropped with the
image by preprocess, area-averaged to the latent grid (and mirrored with the mirror image) by encode, and
weights the training loss; a run without masks keeps its recipes and cache. Trained for real on tiny pretrained
folders of a DDPM family (sd) and a flow-matching one (flux)."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.contracts.data import MANIFEST, MASK_SHA256, PROCESSED_MANIFEST_COLUMNS, decode_png
from pipeline.contracts.latents import load_latents
from pipeline.contracts.paths import Paths
from pipeline.contracts.shards import MASK, read_shard
from pipeline.core.config import ConfigError, MaskedLossParams
from pipeline.core.params_file import parse_params
from pipeline.diffusion.schedule import mask_weights, per_sample_mse, weighted_mse
from pipeline.stages.encode import encode, masks_at_latent_size
from pipeline.stages.ingest import ingest
from pipeline.stages.preprocess import preprocess
from pipeline.stages.train import Conditioning, make_batch, train
from pipeline.stages.validate import validate
from pipeline.stages.vae import vae_stage

from .conftest import merge, tiny_params_dict


def write_cutout(path, seed: int, size: tuple[int, int], alpha: bool = True) -> None:
    """A red subject on a transparent background: alpha of random blocks (0 or 255 at the blocks' edges, soft
    in between after any resize); with alpha=False an opaque image of blocks."""
    rng = np.random.default_rng(seed)
    width, height = size
    blocks = rng.integers(0, 2, (4, 4), dtype=np.uint8) * 255
    blocks[0, 0], blocks[-1, -1] = 255, 0  # never all one value
    if alpha:
        pixels = np.zeros((height, width, 4), np.uint8)
        pixels[..., 3] = np.asarray(Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST))
        # red under the subject, white under the background
        pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 255 - pixels[..., 3], 255 - pixels[..., 3]
        Image.fromarray(pixels, "RGBA").save(path)
    else:
        colours = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(colours).resize(size, Image.Resampling.NEAREST).save(path)


def cutout_project(root, sizes, *, masks=True, opaque=(), overrides=None):
    """A folder source of cut-outs (the indices in `opaque`: opaque images), ingested and validated."""
    source = root / "source"
    source.mkdir(parents=True)
    for index, size in enumerate(sizes):
        write_cutout(source / f"{index}.png", index, size, alpha=index not in opaque)
        (source / f"{index}.txt").write_text(f"a sks bag {index}", encoding="utf-8")
    params = parse_params(merge(tiny_params_dict(), merge({
        "ingest": {"source": "folder", "folder": {"path": str(source)}},
        "validate": {"min_aspect_ratio": 0.2, "max_aspect_ratio": 5.0, "min_rows": 2, "max_bad_fraction": 0.5,
                     "max_brightness": 255, "near_duplicate_min_side": 1000},
        "preprocess": {"masks": masks, "val_fraction": 0.2},
    }, overrides or {})))
    paths = Paths(root / "project")
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    return params, paths, source


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train": {"masked_loss": {"enabled": True}}}, r"train\.masked_loss\.enabled: needs the images' masks; set "
                                                     r"preprocess\.masks: true"),
    ({"train": {"masked_loss": {"unmasked_weight": 1.5}}}, r"train\.masked_loss\.unmasked_weight"),
    ({"train": {"masked_loss": {"weight": 0.5}}}, r"train\.masked_loss\.weight"),
])
def test_a_masked_loss_without_what_it_needs_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(merge(tiny_params_dict(), overrides))


@pytest.mark.parametrize("preprocess_settings", [{"crop": "random"}, {"bucketing": True, "crop": "random"}])
def test_the_alpha_channel_survives_preprocess_cropped_exactly_as_its_image(tmp_path, preprocess_settings):
    sizes = [(40, 24), (24, 56), (48, 48), (60, 30), (30, 40), (44, 32), (32, 64), (56, 40)]
    params, paths, _ = cutout_project(tmp_path, sizes, opaque=(2,), overrides={"preprocess": preprocess_settings})
    preprocess(params.preprocess, paths, params.ray)
    rows = pd.concat([pd.read_parquet(paths.processed / split / MANIFEST) for split in ("train", "val")])
    assert rows["width"].ne(rows["height"]).any() == preprocess_settings.get("bucketing", False)
    checked = 0
    for shard, members in rows.groupby("shard"):
        stored = read_shard(paths.processed / shard, ["image", MASK, MASK_SHA256])
        for _, row in members.iterrows():
            image, mask = decode_png(stored.at[row["id"], "image"]), stored.at[row["id"], MASK]
            if pd.isna(row[MASK_SHA256]):
                assert mask is None, "an opaque image has no mask"
                continue
            mask = decode_png(mask)
            assert mask.shape == image.shape[:2] == (row["height"], row["width"])
            # red over white: green = 255 * (1 - alpha) before and after the same (linear, clipped) resampling
            assert np.abs(image[..., 1].astype(int) + mask.astype(int) - 255).max() <= 1, row["id"]
            assert mask.min() < 64 and mask.max() > 192, "the crop keeps subject and background"
            checked += 1
    assert checked == len(sizes) - 1
    assert rows[MASK_SHA256].isna().sum() == 1


def test_a_run_without_masks_keeps_its_recipes_and_shards(tmp_path):
    sizes = [(40, 24), (24, 56), (48, 48), (60, 30), (30, 40)]
    params, paths, _ = cutout_project(tmp_path, sizes, masks=False)
    preprocess(params.preprocess, paths, params.ray)
    plain = pd.read_parquet(paths.processed / "train" / MANIFEST)
    assert tuple(plain.columns) == PROCESSED_MANIFEST_COLUMNS
    assert MASK not in read_shard(paths.processed / plain["shard"].iat[0]).columns
    masked_params = parse_params(merge(params.model_dump(by_alias=True), {"preprocess": {"masks": True}}))
    preprocess(masked_params.preprocess, paths, masked_params.ray)
    masked = pd.read_parquet(paths.processed / "train" / MANIFEST)
    assert set(masked["recipe"]).isdisjoint(plain["recipe"]), "turning masks on converts the shards again"
    preprocess(params.preprocess, paths, params.ray)
    assert pd.read_parquet(paths.processed / "train" / MANIFEST).equals(plain), "and off, the same as before"


def png(pixels: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "L").save(out, format="PNG")
    return out.getvalue()


def test_masks_are_area_averaged_to_the_latent_grid_and_mirrored_with_the_mirror_image():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24)).astype(np.uint8)
    latent = masks_at_latent_size([png(pixels), None], (16, 24), (2, 3), mirrored=False)
    blocks = pixels.reshape(2, 8, 3, 8).mean(axis=(1, 3)) / 255
    assert latent.shape == (2, 1, 2, 3)
    np.testing.assert_allclose(latent[0, 0].numpy(), blocks, rtol=1e-6)
    assert torch.equal(latent[1], torch.ones(1, 2, 3)), "no mask: 1 everywhere"
    mirrored = masks_at_latent_size([png(pixels)], (16, 24), (2, 3), mirrored=True)
    np.testing.assert_allclose(mirrored[0, 0].numpy(), blocks[:, ::-1], rtol=1e-6)


ERROR_SHAPE = (2, 4, 4, 4)


def fixed_case():
    """A prediction whose error lies only outside the mask of sample 0 (left half) and everywhere in sample 1."""
    target = torch.randn(ERROR_SHAPE, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, :, :, :2] = 1.0
    masks[1, :, :2] = 1.0
    prediction = target.clone()
    prediction[0, :, :, 2:] += 1.0
    prediction[1] += 0.5
    return prediction, target, masks


def test_the_masked_loss_on_fixed_tensors():
    prediction, target, masks = fixed_case()
    plain = F.mse_loss(prediction, target)
    for normalize in (False, True):
        assert weighted_mse(prediction, target, None, mask_weights(masks, 1.0, normalize)) == pytest.approx(
            plain.item(), rel=1e-6), "unmasked_weight 1: the plain loss"
    ignored = per_sample_mse(prediction, target, None, mask_weights(masks, 0.0, False))
    assert ignored[0].item() == 0.0, "weight 0: an error outside the mask costs nothing"
    assert ignored[1].item() == pytest.approx(0.25 / 2), "half the area in the mask: mean(w * error)"
    normalized = per_sample_mse(prediction, target, None, mask_weights(masks, 0.0, True))
    assert normalized[1].item() == pytest.approx(0.25), "sum(w * error) / sum(w): the mask's own mean error"
    floor = per_sample_mse(prediction, target, None, mask_weights(masks, 0.2, True))
    w = 0.2 + 0.8 * masks[0].expand(4, 4, 4)
    assert floor[0].item() == pytest.approx(((w * (prediction[0] - target[0]) ** 2).sum() / w.sum()).item(), rel=1e-6)
    snr = torch.tensor([2.0, 3.0])
    assert torch.allclose(per_sample_mse(prediction, target, snr, mask_weights(masks, 0.2, True)), floor * snr), \
        "composes with the per-sample weights (min-SNR, flow weighting)"
    empty = per_sample_mse(prediction, target, None, mask_weights(torch.zeros(2, 1, 4, 4), 0.0, True))
    assert torch.equal(empty, torch.zeros(2)), "an empty mask with no floor: 0, not NaN"


SIZES = [(40, 32), (32, 48), (48, 32), (32, 32), (36, 32), (32, 40), (44, 36), (40, 40), (32, 44), (48, 40)]


def finetune_overrides(base: str, family: str, **train) -> dict:
    return {"model": {"mode": "finetune", "pretrained": base, "family": family, "max_sequence_length": 8},
            "encode": {"mirrored": True},
            "train": {"steps": 3, "batch_size": 4, "learning_rate": 0.01, "validate_every": 3, "sample_every": 0,
                      "checkpoint_every": 3, "log_every": 1, "warmup_steps": 0, "random_flip": True,
                      "masked_loss": {"enabled": True, "unmasked_weight": 0.1, "normalize_by_area": True}, **train}}


def encoded_project(root, base: str, family: str, opaque=()):
    params, paths, source = cutout_project(root, SIZES, opaque=opaque, overrides=finetune_overrides(base, family))
    preprocess(params.preprocess, paths, params.ray)
    vae_stage(paths, vae=params.vae, model=params.model, preprocess=params.preprocess)
    return params, paths, source, encode(paths, encode=params.encode, model=params.model, ray=params.ray)


def test_a_flipped_sample_trains_with_its_flipped_mask(tmp_path, bases):
    params, paths, _, _ = encoded_project(tmp_path, bases["sd"], "sd")
    cache = load_latents(paths.latents, "train")
    group = cache.groups[0]
    assert torch.allclose(group.flip_mask.load(), group.mask.load().flip(-1)), "the mirror image's mask"
    positions = torch.arange(len(group))
    conditioning = Conditioning({}, torch.zeros(len(cache), dtype=torch.long), {})
    settings = MaskedLossParams(enabled=True)
    batch = make_batch(cache, conditioning, 0, positions, to_denoiser=lambda latents: latents, caption_dropout=0.0,
                       random_flip=True, generator=torch.Generator().manual_seed(5), masked_loss=settings)
    weights = batch.pixel_weights.values
    flipped = torch.tensor([torch.equal(w, m) for w, m in zip(weights, group.flip_mask[positions], strict=True)])
    assert torch.equal(weights[~flipped], group.mask[positions][~flipped]), "the others keep their own"
    assert 0 < int(flipped.sum()) < len(positions), "some of each"
    # the latents of exactly those samples came from the mirrored posteriors (the noise is the batch's first draw)
    noise = torch.randn(group.mean[positions].shape, generator=torch.Generator().manual_seed(5))
    chosen = flipped[:, None, None, None]
    expected = (torch.where(chosen, group.flip_mean[positions], group.mean[positions])
                + torch.where(chosen, group.flip_std[positions], group.std[positions]) * noise)
    assert torch.allclose(batch.latents, expected.float())


def test_changing_one_mask_re_encodes_only_its_shard(tmp_path, bases):
    params, paths, source, first = encoded_project(tmp_path, bases["sd"], "sd")
    before = {path.name: path.stat().st_mtime_ns for path in (paths.latents / "shards").iterdir()}
    extra = source / "extra"
    extra.mkdir()
    for index in (20, 21):  # a second ingest: a second raw shard, so a second processed shard per split
        write_cutout(extra / f"{index}.png", index, (40, 32))
        (extra / f"{index}.txt").write_text(f"a sks bag {index}", encoding="utf-8")
    for step in ("add", "change"):
        if step == "change":  # the subject's outline changes (red under the new outline: not a blank image)
            pixels = np.asarray(Image.open(extra / "21.png")).copy()
            pixels[..., 3] = 255 - pixels[..., 3]
            pixels[..., 1] = pixels[..., 2] = 255 - pixels[..., 3]
            Image.fromarray(pixels, "RGBA").save(extra / "21.png")
            before = {path.name: path.stat().st_mtime_ns for path in (paths.latents / "shards").iterdir()}
        ingest(params.ingest, paths)
        validate(params.validate_, paths)
        preprocess(params.preprocess, paths, params.ray)
        counts = encode(paths, encode=params.encode, model=params.model, ray=params.ray)
    rows = pd.concat([pd.read_parquet(paths.latents / f"{split}.parquet") for split in ("train", "val")])
    changed = rows[rows["caption"] == "a sks bag 21"]
    shard_rows = rows[rows["posterior"] == changed["posterior"].iat[0]]
    assert counts["encoded"] == 2 * len(shard_rows), "its shard's images and their mirror images, nothing else"
    assert counts["reused"] == 2 * (len(rows) - len(shard_rows)) and first["encoded"] == 2 * len(SIZES)
    after = {path.name: path.stat().st_mtime_ns for path in (paths.latents / "shards").iterdir()}
    kept = set(before) & set(after)
    assert all(before[name] == after[name] for name in kept) and len(set(after) - kept) <= 3


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_masked_run_trains_from_a_tiny_pretrained_model(tmp_path, bases, family, caplog):
    params, paths, _, _ = encoded_project(tmp_path, bases[family], family, opaque=(3,))
    train_rows = pd.read_parquet(paths.latents / "train.parquet")
    with caplog.at_level("INFO", logger="pipeline.stages.train"):
        metrics = train(params, paths, tracked=False)
    masked = int(train_rows[MASK_SHA256].notna().sum())
    assert 0 < masked < len(train_rows) or "a sks bag 3" not in set(train_rows["caption"])
    assert f"masked loss on {masked} of {len(train_rows)} training images" in caplog.text
    assert np.isfinite(metrics["final_loss"]) and metrics["steps"] == 3
    assert (paths.sd_model / "model_index.json").is_file()


def test_a_masked_loss_over_images_without_transparency_is_refused(tmp_path, bases):
    params, paths, _, _ = encoded_project(tmp_path, bases["sd"], "sd", opaque=tuple(range(len(SIZES))))
    with pytest.raises(ValueError, match=r"train\.masked_loss\.enabled but no training image has a mask"):
        train(params, paths, tracked=False)
