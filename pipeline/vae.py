"""Stage `vae`: train a small AutoencoderKL from scratch, or resolve a pretrained model's VAE.

Scratch mode trains on the processed training images (one aspect-ratio bucket per batch when
`preprocess.bucketing` is on) and sets `scaling_factor` so that scaled latents have unit variance;
finetune mode copies the pretrained VAE (`model.pretrained`) unchanged. Either way models/vae is a
diffusers folder and metrics/vae.json holds the reconstruction error on the validation split, so a
pretrained VAE that does not suit the data shows up before any training.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from pipeline.atomic import atomic_dir, write_json
from pipeline.config import ModelParams, PreprocessParams, TrainParams, VaeParams
from pipeline.contracts.data import load_split, load_split_groups
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import VAE_METRICS
from pipeline.device import compute_device
from pipeline.models import build_vae, device_batches, load_pretrained_vae, reconstruct, to_model_range

log = logging.getLogger(__name__)

def reconstruction_loss(vae, batch: torch.Tensor, kl_weight: float) -> torch.Tensor:
    posterior = vae.encode(batch).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    return F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()


def sample_batch(groups: list[torch.Tensor], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A batch of images of one size (an aspect-ratio bucket: a batch must be one tensor), the size chosen
    with probability proportional to its image count, so every image is equally likely to be seen. With one
    size no choice is drawn, so a square data set draws exactly the batches a single pool of images would."""
    images = groups[0]
    if len(groups) > 1:
        counts = torch.tensor([len(group) for group in groups], dtype=torch.float64)
        images = groups[int(torch.multinomial(counts, 1, generator=generator))]
    return images[torch.randint(len(images), (batch_size,), generator=generator)]


@torch.no_grad()
def latent_std(vae, groups: list[torch.Tensor]) -> float:
    """The standard deviation of the latent means over every image, whatever their sizes."""
    means = [vae.encode(batch).latent_dist.mean.float().flatten().cpu()
             for images in groups for batch in device_batches(images, vae.device, vae.dtype)]
    return float(torch.cat(means).std())


def reconstruction_mse(vae, images: torch.Tensor) -> float:
    return float(F.mse_loss(reconstruct(vae, images), images))


def train_vae(settings: VaeParams, paths: Paths, *, resolution: int, mixed_precision: str) -> dict:
    set_seed(settings.seed)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    train_groups = [to_model_range(images) for images, _ in load_split_groups(paths, "train")]
    val_images = to_model_range(load_split(paths, "val")[0])
    vae = build_vae(settings, resolution)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    vae, optimizer = accelerator.prepare(vae, optimizer)
    generator = torch.Generator().manual_seed(settings.seed)

    vae.train()
    started = time.perf_counter()
    progress = tqdm(range(settings.steps), desc="vae", disable=not accelerator.is_local_main_process)
    for _ in progress:
        batch = sample_batch(train_groups, settings.batch_size, generator).to(accelerator.device)
        with accelerator.autocast():
            loss = reconstruction_loss(accelerator.unwrap_model(vae), batch, settings.kl_weight)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - started

    vae = accelerator.unwrap_model(vae).eval()
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae, train_groups))
    return save_vae(vae, val_images, paths, steps=settings.steps,
                    images_per_second=settings.steps * settings.batch_size / seconds)


def resolve_pretrained_vae(pretrained: str, paths: Paths) -> dict:
    """The pretrained model's VAE, unchanged (its own scaling factor), measured on the validation split."""
    vae = load_pretrained_vae(pretrained, paths.root).to(compute_device()).eval()
    return save_vae(vae, to_model_range(load_split(paths, "val")[0]), paths, pretrained=pretrained)


def save_vae(vae, val_images: torch.Tensor, paths: Paths, **facts) -> dict:
    mse = reconstruction_mse(vae, val_images)
    metrics = dict(
        val_mse=mse,
        val_psnr=10 * math.log10(4.0 / mse),  # images span [-1, 1], so the peak-to-peak range is 2
        scaling_factor=vae.config.scaling_factor,
        **facts,
    )
    with atomic_dir(paths.vae_model) as staging:
        vae.save_pretrained(staging, safe_serialization=True)
    write_json(paths.metrics / VAE_METRICS, metrics)
    log.info("vae: val MSE %.5f, PSNR %.2f dB", mse, metrics["val_psnr"])
    return metrics


def vae_stage(paths: Paths, *, vae: VaeParams, model: ModelParams, preprocess: PreprocessParams,
              train: TrainParams) -> dict:
    if model.mode == "finetune":
        return resolve_pretrained_vae(model.pretrained, paths)
    return train_vae(vae, paths, resolution=preprocess.resolution, mixed_precision=train.mixed_precision)
