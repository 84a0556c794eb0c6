"""The VAE stage on a bucketed train split; the square chain is covered in test_training_chain.py."""

import math

import torch
from diffusers import AutoencoderKL

from pipeline.contracts.data import load_split_groups
from pipeline.preprocess import preprocess
from pipeline.vae import sample_batch, train_vae

from .conftest import folder_project

SHAPES = [(24, 20), (40, 20), (20, 40), (32, 32), (48, 24)] * 6


def test_a_batch_comes_from_one_size_chosen_in_proportion_to_its_images():
    groups = [torch.zeros(30, 3, 2, 4), torch.ones(10, 3, 4, 2)]
    generator = torch.Generator().manual_seed(0)
    batches = [sample_batch(groups, 5, generator) for _ in range(400)]
    wide = sum(batch.shape[2:] == (2, 4) for batch in batches)
    assert all(batch.shape[0] == 5 for batch in batches) and 270 < wide < 330  # 3 in 4 of 400


def test_one_size_draws_the_batches_a_single_pool_would():
    images = torch.arange(20.0).reshape(20, 1, 1, 1)
    drawn = sample_batch([images], 8, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, images[torch.randint(20, (8,), generator=torch.Generator().manual_seed(3))])


def test_the_vae_trains_on_a_bucketed_train_split(tmp_path):
    params, paths = folder_project(tmp_path, SHAPES, val_fraction=0.2, bucketing=True)
    params = params.model_copy(update={"vae": params.vae.model_copy(update={"steps": 4, "batch_size": 4})})
    preprocess(params.preprocess, paths)
    assert len(load_split_groups(paths, "train")) > 1
    metrics = train_vae(params.vae, paths, resolution=params.preprocess.resolution,
                        mixed_precision=params.train.mixed_precision)
    assert math.isfinite(metrics["val_mse"]) and metrics["scaling_factor"] > 0
    assert AutoencoderKL.from_pretrained(paths.vae_model).config.scaling_factor == metrics["scaling_factor"]
