"""Stage `vae`: train a small AutoencoderKL from scratch, or resolve a pretrained model's VAE.

Scratch mode builds the family's VAE (its latent space's class, pipeline/diffusion/latent_space.py; latent
channels the family's unless `vae.latent_channels` says otherwise), trains it on the processed training images
(one aspect-ratio bucket per batch when `preprocess.bucketing` is on) and fits the latents' normalisation to the
images training drew, as the family's pipeline undoes it before decoding: an AutoencoderKL's `scaling_factor`
(unit variance) and, for the families with a shift (sd3, flux, chroma), `shift_factor` (zero mean); Flux.2's
BatchNorm running mean and variance of the 2x2-patchified latents. Finetune mode copies the pretrained VAE
(`model.pretrained`) unchanged, its files as they are. Either way models/vae is a diffusers folder and metrics/vae.json holds the reconstruction error on the validation split, so a
pretrained VAE that does not suit the data shows up before any training.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pipeline.contracts.data import read_images, split_chunks, split_groups
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import VAE_METRICS
from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.config import ModelParams, PreprocessParams, VaeParams, latent_channels_of
from pipeline.diffusion.components import component_folder, load_pretrained
from pipeline.diffusion.families import family_named
from pipeline.diffusion.latent_space import LatentSpace, Posteriors, decoded, posterior
from pipeline.diffusion.vae_io import device_batches, reconstruct, to_model_range
from pipeline.runtime.device import compute_device

log = logging.getLogger(__name__)


def reconstruction_loss(vae, batch: torch.Tensor, kl_weight: float) -> torch.Tensor:
    moments = posterior(vae, batch)
    reconstruction = decoded(vae, moments.sample())
    return F.mse_loss(reconstruction, batch) + kl_weight * moments.kl().mean()


def drawn_batches(group_sizes: list[int], steps: int, batch_size: int,
                  generator: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """Every step's batch as (size group, positions in it), drawn before training: one size per batch (an
    aspect-ratio bucket: a batch must be one tensor), chosen with probability proportional to its image
    count, so every image is equally likely to be seen. With one size no choice is drawn, so a square data
    set draws exactly the batches a single pool of images would."""
    counts = torch.tensor(group_sizes, dtype=torch.float64)
    batches = []
    for _ in range(steps):
        group = int(torch.multinomial(counts, 1, generator=generator)) if len(group_sizes) > 1 else 0
        batches.append((group, torch.randint(group_sizes[group], (batch_size,), generator=generator)))
    return batches


@dataclass(frozen=True)
class DrawnImages:
    """The images of one size that training draws, decoded once: at most steps x batch_size of them, not
    the whole split (a million images would not fit in memory)."""

    positions: torch.Tensor  # sorted positions in the size group
    images: torch.Tensor  # in the model's range

    def batch(self, positions: torch.Tensor) -> torch.Tensor:
        return self.images[torch.searchsorted(self.positions, positions)]


def drawn_images(paths: Paths, groups: list[pd.DataFrame], batches: list[tuple[int, torch.Tensor]]) -> list[DrawnImages]:
    drawn = []
    for group, rows in enumerate(groups):
        wanted = torch.unique(torch.cat([torch.empty(0, dtype=torch.long)] + [p for g, p in batches if g == group]))
        images = to_model_range(read_images(paths, rows.iloc[wanted.numpy()])) if len(wanted) else torch.empty(0)
        drawn.append(DrawnImages(wanted, images))
    return drawn


@torch.no_grad()
def latent_posteriors(vae, groups: list[torch.Tensor]) -> list[Posteriors]:
    """The posterior means and standard deviations of these images on the CPU, a batch of one size each."""
    posteriors = []
    for images in groups:
        for batch in device_batches(images, vae.device, vae.dtype):
            moments = posterior(vae, batch)
            posteriors.append(Posteriors(moments.mean.float().cpu(), moments.std.float().cpu()))
    return posteriors


def reconstruction_mse(vae, chunks: Iterable[np.ndarray]) -> float:
    """The mean squared reconstruction error over the pixels of uint8 NHWC chunks (`split_chunks`)."""
    squared_error, count = 0.0, 0
    for chunk in chunks:
        images = to_model_range(chunk)
        squared_error += float(F.mse_loss(reconstruct(vae, images).double(), images.double(), reduction="sum"))
        count += images.numel()
    return squared_error / count


def train_vae(settings: VaeParams, paths: Paths, *, resolution: int, latent_channels: int, space: LatentSpace) -> dict:
    set_seed(settings.seed)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    groups = split_groups(paths, "train")
    generator = torch.Generator().manual_seed(settings.seed)
    batches = drawn_batches([len(rows) for rows in groups], settings.steps, settings.batch_size, generator)
    train_groups = drawn_images(paths, groups, batches)
    vae = space.build_vae(settings, resolution, latent_channels)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    vae, optimizer = accelerator.prepare(vae, optimizer)

    vae.train()
    started = time.perf_counter()
    progress = tqdm(range(settings.steps), desc="vae", disable=not accelerator.is_local_main_process)
    for step in progress:
        group, positions = batches[step]
        batch = train_groups[group].batch(positions).to(accelerator.device)
        with accelerator.autocast():
            loss = reconstruction_loss(accelerator.unwrap_model(vae), batch, settings.kl_weight)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - started

    vae = accelerator.unwrap_model(vae).eval()
    # over the images training drew: all of a small data set, a sample of steps x batch_size of a large one
    seen = [drawn.images for drawn in train_groups if len(drawn.positions)]
    space.fit(vae, latent_posteriors(vae, seen))
    return save_vae(vae, space, paths, steps=settings.steps,
                    images_per_second=settings.steps * settings.batch_size / seconds)


def resolve_pretrained_vae(pretrained: str, space: LatentSpace, paths: Paths) -> dict:
    """The pretrained model's VAE files, copied unchanged (its own latent normalisation; the saved model's VAE is
    these files), measured on the validation split."""
    vae = load_pretrained(pretrained, paths.root, "vae", space.vae_class.from_pretrained).to(compute_device()).eval()
    metrics = vae_metrics(vae, space, paths, pretrained=pretrained)
    with atomic_dir(paths.vae_model) as staging:
        shutil.copytree(component_folder(pretrained, paths.root, "vae"), staging, dirs_exist_ok=True)
    return recorded(metrics, paths)


def save_vae(vae, space: LatentSpace, paths: Paths, **facts) -> dict:
    metrics = vae_metrics(vae, space, paths, **facts)
    with atomic_dir(paths.vae_model) as staging:
        vae.save_pretrained(staging, safe_serialization=True)
    return recorded(metrics, paths)


def vae_metrics(vae, space: LatentSpace, paths: Paths, **facts) -> dict:
    mse = reconstruction_mse(vae, split_chunks(paths, "val"))
    metrics = dict(
        val_mse=mse,
        val_psnr=10 * math.log10(4.0 / mse),  # images span [-1, 1], so the peak-to-peak range is 2
        **space.statistics(vae),
        **facts,
    )
    return metrics


def recorded(metrics: dict, paths: Paths) -> dict:
    write_json(paths.metrics / VAE_METRICS, metrics)
    log.info("vae: val MSE %.5f, PSNR %.2f dB", metrics["val_mse"], metrics["val_psnr"])
    return metrics


def vae_stage(paths: Paths, *, vae: VaeParams, model: ModelParams, preprocess: PreprocessParams) -> dict:
    space = family_named(model.family).latent_space
    if model.mode == "finetune":
        return resolve_pretrained_vae(model.pretrained, space, paths)
    return train_vae(vae, paths, resolution=preprocess.resolution, latent_channels=latent_channels_of(vae, model.family),
                     space=space)
