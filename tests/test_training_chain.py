"""vae, encode, train and evaluate on the tiny chain that `trained_project` ran once."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from pipeline.contracts.data import load_split, split_chunks
from pipeline.contracts.latents import load_latents
from pipeline.contracts.records import LOSS_PLOT
from pipeline.diffusion.families import load_pipeline
from pipeline.evaluation.noise_metrics import noise_metrics_on
from pipeline.stages.evaluate import noise_prediction_metrics, vae_reconstruction_metrics
from pipeline.stages.train import batch_indices
from pipeline.stages.vae import reconstruction_mse


def test_vae_is_a_diffusers_model_with_unit_variance_scaling(trained_project):
    _, paths = trained_project
    vae = AutoencoderKL.from_pretrained(paths.vae_model)
    metrics = json.loads((paths.metrics / "vae.json").read_text())
    assert vae.config.scaling_factor == metrics["scaling_factor"] > 0
    assert metrics["val_mse"] > 0


def test_latents_are_cached_for_both_splits(trained_project):
    _, paths = trained_project
    train, val = load_latents(paths.latents, "train"), load_latents(paths.latents, "val")
    assert train.single_size().mean.shape[1:] == (4, 8, 8) and len(train) == len(train.captions)
    assert (val.single_size().std.load() > 0).all()


def test_validation_metrics_read_the_split_a_batch_at_a_time_and_agree_with_one_pass(trained_project):
    _, paths = trained_project
    pipeline = load_pipeline(paths.sd_model)
    val = load_latents(paths.latents, "val")
    mean, captions = val.single_size().mean, val.captions
    assert len(captions) > 6, "the split must span several batches of 3"
    whole = noise_metrics_on(pipeline, mean.load().float(), captions, (100, 900), 7, batch_size=len(captions))
    assert noise_metrics_on(pipeline, mean, captions, (100, 900), 7, batch_size=3) == pytest.approx(whole, rel=1e-5)

    images = load_split(paths, "val")[0]
    chunks = list(split_chunks(paths, "val", chunk=3))
    assert {len(chunk) for chunk in chunks[:-1]} == {3} and np.array_equal(np.concatenate(chunks), images)
    assert vae_reconstruction_metrics(pipeline, chunks) == pytest.approx(
        vae_reconstruction_metrics(pipeline, [images]), rel=1e-6)  # float32 convolutions vary with the batch
    assert reconstruction_mse(pipeline.vae, chunks) == pytest.approx(reconstruction_mse(pipeline.vae, [images]), rel=1e-6)


def test_model_folder_loads_in_plain_diffusers(trained_project):
    _, paths = trained_project
    pipeline = StableDiffusionPipeline.from_pretrained(paths.sd_model)
    image = pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert list(paths.sd_model.rglob("*.safetensors"))
    assert not list(paths.sd_model.rglob("*.bin"))


def test_loss_curve_and_run_record(trained_project):
    params, paths = trained_project
    rows = (paths.metrics / LOSS_PLOT).read_text().splitlines()
    assert rows[0] == "step,loss" and rows[-1].startswith(f"{params.train.steps},")
    assert json.loads(paths.run_record.read_text())["run_id"]


def test_batches_cover_every_sample_each_epoch_across_processes():
    def positions(micros, processes=(0, 1)):
        return torch.cat([batch_indices(micro, (12,), 3, 2, process, seed=0)[1] for micro in micros for process in processes])

    epoch, next_epoch = positions(range(2)), positions((2, 3))
    assert sorted(epoch.tolist()) == list(range(12))
    assert sorted(next_epoch.tolist()) == list(range(12)) and not torch.equal(epoch, next_epoch)
    assert torch.equal(batch_indices(5, (12,), 3, 2, 1, seed=0)[1], batch_indices(5, (12,), 3, 2, 1, seed=0)[1])


def test_batches_never_mix_image_sizes_and_drop_no_sample():
    sizes = (5, 3, 1)  # e.g. three aspect-ratio buckets
    epoch = [batch_indices(micro, sizes, 2, 1, 0, seed=0) for micro in range(5)]  # 3 + 2 + 1 batches ...
    assert len({(group, tuple(p.tolist())) for group, p in epoch}) == 5
    seen = {group: sorted(p for g, positions in epoch if g == group for p in positions.tolist()) for group in range(3)}
    assert seen[0] == list(range(5)) or len(seen[0]) < 5  # ... of which the epoch's 6th is the next micro-batch
    whole = [batch_indices(micro, sizes, 2, 1, 0, seed=0) for micro in range(6)]
    assert {group: sorted(p for g, positions in whole if g == group for p in positions.tolist()) for group in range(3)} \
        == {0: [0, 1, 2, 3, 4], 1: [0, 1, 2], 2: [0]}
    assert all(len(positions) <= 2 for _, positions in whole)


def test_evaluation_is_deterministic(trained_project):
    params, paths = trained_project
    pipeline = load_pipeline(paths.sd_model)
    first = noise_prediction_metrics(pipeline, paths, params.evaluate)
    assert first == noise_prediction_metrics(pipeline, paths, params.evaluate)
    recorded = json.loads((paths.metrics / "eval.json").read_text())
    assert recorded["noise_mse"] == first["noise_mse"]
    assert recorded["noise_rmse"] ** 2 == pytest.approx(recorded["noise_mse"], rel=1e-6)
    assert 0 <= recorded["adherence"] <= min(recorded["colour_accuracy"], recorded["shape_accuracy"])
    repeats = params.evaluate.stability_repeats
    assert recorded["adherence_samples"] == 12 * params.evaluate.samples_per_prompt * repeats
    assert recorded["adherence_std"] >= 0 and recorded["deterministic"] == 1.0
    assert 0 < recorded["vae_mse"] and recorded["vae_ssim"] <= 1
    assert paths.samples_grid.is_file()



def test_ssim_is_one_for_identical_images_and_lower_for_noisy_ones():
    from pipeline.stages.evaluate import gaussian_ssim

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(gaussian_ssim(images, images), torch.ones(2, dtype=torch.float64))
    noisy = (images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).clamp(0, 1)
    assert (gaussian_ssim(noisy, images) < 0.9).all()
