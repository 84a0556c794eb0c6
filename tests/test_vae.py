"""The VAE stage on a bucketed train split; the square chain is covered in test_training_chain.py."""

import math

import torch
import pytest
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage

from pipeline.contracts.data import load_split_groups, split_groups
from pipeline.core.config import VaeParams
from pipeline.diffusion.latent_space import FrameLatents, PatchNormalisedLatents, ScaledLatents, posterior
from pipeline.diffusion.vae_io import to_model_range
from pipeline.stages.preprocess import preprocess
from pipeline.stages.vae import drawn_batches, drawn_images, train_vae

from .conftest import folder_project

SHAPES = [(24, 20), (40, 20), (20, 40), (32, 32), (48, 24)] * 6


def test_a_batch_comes_from_one_size_chosen_in_proportion_to_its_images():
    batches = drawn_batches([30, 10], 400, 5, torch.Generator().manual_seed(0))
    first = sum(group == 0 for group, _ in batches)
    assert 270 < first < 330  # 3 in 4 of 400
    assert all(len(positions) == 5 and int(positions.max()) < (30, 10)[group] for group, positions in batches)


def test_one_size_draws_the_batches_a_single_pool_would():
    generator = torch.Generator().manual_seed(3)
    drawn = drawn_batches([20], 2, 8, torch.Generator().manual_seed(3))
    assert [group for group, _ in drawn] == [0, 0]
    for _, positions in drawn:
        assert torch.equal(positions, torch.randint(20, (8,), generator=generator))


def test_only_the_images_training_draws_are_decoded(tmp_path):
    params, paths = folder_project(tmp_path, SHAPES, val_fraction=0.2, bucketing=True)
    preprocess(params.preprocess, paths)
    groups = split_groups(paths, "train")
    batches = drawn_batches([len(rows) for rows in groups], 3, 2, torch.Generator().manual_seed(0))
    drawn = drawn_images(paths, groups, batches)
    assert sum(len(images.positions) for images in drawn) <= 6 < sum(len(rows) for rows in groups)
    everything = [to_model_range(images) for images, _ in load_split_groups(paths, "train")]
    for group, positions in batches:
        assert torch.equal(drawn[group].batch(positions), everything[group][positions])


def test_the_vae_trains_on_a_bucketed_train_split(tmp_path):
    params, paths = folder_project(tmp_path, SHAPES, val_fraction=0.2, bucketing=True)
    params = params.model_copy(update={"vae": params.vae.model_copy(update={"steps": 4, "batch_size": 4})})
    preprocess(params.preprocess, paths)
    assert len(load_split_groups(paths, "train")) > 1
    # the flow families' layout: 16 channels, and a fitted shift (the latents' mean) taken off before scaling
    metrics = train_vae(params.vae, paths, resolution=params.preprocess.resolution, latent_channels=16,
                        space=ScaledLatents(shifted=True))
    assert math.isfinite(metrics["val_mse"]) and metrics["scaling_factor"] > 0
    vae = AutoencoderKL.from_pretrained(paths.vae_model)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (metrics["scaling_factor"], metrics["shift_factor"])
    assert vae.config.latent_channels == 16
    space = ScaledLatents(shifted=True)
    with torch.no_grad():  # fitted on the images training drew: most of these
        latents = torch.cat([space.to_denoiser(vae.encode(to_model_range(images)).latent_dist.mean, vae).flatten()
                             for images, _ in load_split_groups(paths, "train")])
    assert vae.config.shift_factor != 0 and abs(float(latents.mean())) < 0.05 and abs(float(latents.std()) - 1) < 0.1


@torch.no_grad()
def sampled_denoiser_inputs(space, vae, paths, draws: int = 8) -> torch.Tensor:
    """The denoiser's inputs as training draws them (posterior mean + std * noise), `draws` per train image: what
    the per-channel statistics must standardise, not the means alone (whose spread is smaller)."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for images, _ in load_split_groups(paths, "train"):
        moments = posterior(vae, to_model_range(images))
        for _ in range(draws):
            noise = torch.randn(moments.mean.shape, generator=generator)
            inputs.append(space.to_denoiser(moments.mean + moments.std * noise, vae))
    return torch.cat(inputs)


def test_a_flux2_vae_fits_its_batchnorm_statistics_to_the_patchified_latents(tmp_path):
    """Flux.2's space: each of the 4C channels of the 2x2-patchified latents standardised by the VAE's BatchNorm
    running statistics, which a fresh AutoencoderKLFlux2 has at mean 0 and variance 1 and the vae stage fits to the
    latents training draws."""
    params, paths = folder_project(tmp_path, SHAPES, val_fraction=0.2)
    # 96 draws of the 24 train images: fitted on (nearly) all of them
    params = params.model_copy(update={"vae": params.vae.model_copy(update={"steps": 4, "batch_size": 24})})
    preprocess(params.preprocess, paths)
    space = PatchNormalisedLatents()
    metrics = train_vae(params.vae, paths, resolution=params.preprocess.resolution, latent_channels=2, space=space)
    vae = AutoencoderKLFlux2.from_pretrained(paths.vae_model)
    assert vae.bn.num_features == 8 and metrics["latent_std"] > 0
    assert not torch.equal(vae.bn.running_mean, torch.zeros(8)) and not torch.equal(vae.bn.running_var, torch.ones(8))
    latents = sampled_denoiser_inputs(space, vae, paths)
    assert latents.shape[1:] == (8, 4, 4)
    per_channel = latents.transpose(0, 1).flatten(1)
    assert per_channel.mean(dim=1).abs().max() < 0.05 and (per_channel.std(dim=1) - 1).abs().max() < 0.1


def test_a_qwenimage_vae_fits_per_channel_statistics_to_its_one_frame_latents(tmp_path):
    """Qwen-Image's space: a video VAE fed each image as one frame, its (N, C, H, W) latents standardised per
    channel by the config's latents_mean/latents_std, which a fresh AutoencoderKLQwenImage has at 0 and 1 and
    the vae stage fits."""
    params, paths = folder_project(tmp_path, SHAPES, val_fraction=0.2)
    params = params.model_copy(update={"vae": params.vae.model_copy(update={"steps": 4, "batch_size": 24})})
    preprocess(params.preprocess, paths)
    space = FrameLatents()
    metrics = train_vae(params.vae, paths, resolution=params.preprocess.resolution, latent_channels=3, space=space)
    vae = AutoencoderKLQwenImage.from_pretrained(paths.vae_model)
    assert len(vae.config.latents_mean) == 3 and math.isfinite(metrics["val_mse"]) and metrics["latent_std"] > 0
    assert vae.config.latents_mean != [0.0] * 3 and vae.config.latents_std != [1.0] * 3
    latents = sampled_denoiser_inputs(space, vae, paths)
    assert latents.shape[1:] == (3, 8, 8)
    per_channel = latents.transpose(0, 1).flatten(1)
    assert per_channel.mean(dim=1).abs().max() < 0.05 and (per_channel.std(dim=1) - 1).abs().max() < 0.1


def test_a_qwenimage_vae_needs_level_channels_that_are_multiples_of_the_first():
    with pytest.raises(ValueError, match=r"vae.block_out_channels: \[16, 24\]: AutoencoderKLQwenImage takes channels"):
        FrameLatents().build_vae(VaeParams(block_out_channels=(16, 24)), 32, 16)
