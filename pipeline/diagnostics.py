"""Measurements that train (validation loss, sample grids during training) and evaluate share."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from pipeline.diffusion import training_target
from pipeline.models import tokenize

GRID_ZOOM = 4


@torch.no_grad()
def noise_metrics_on(
    pipeline: StableDiffusionPipeline, latent_means: torch.Tensor, captions: list[str],
    timesteps: tuple[int, ...], noise_seed: int,
) -> dict:
    """Prediction errors on given VAE latent means at fixed timesteps and noise seeds. The target is
    what the model was trained to predict: the noise, or the velocity for v-prediction models."""
    device = pipeline.unet.device
    latents = latent_means.to(device) * pipeline.vae.config.scaling_factor
    states = pipeline.text_encoder(tokenize(pipeline.tokenizer, captions).to(device))[0]
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)  # the forward process used in training
    buckets = {}
    for timestep in timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(noise_seed + timestep)).to(device)
        steps = torch.full((len(latents),), timestep, dtype=torch.long, device=device)
        prediction = pipeline.unet(scheduler.add_noise(latents, noise, steps), steps, states).sample
        target = training_target(scheduler, latents, noise, steps)
        buckets[timestep] = (prediction.flatten().cpu(), target.flatten().cpu())
    metrics = {}
    for timestep, (prediction, target) in buckets.items():
        metrics.update({f"{name}_t{timestep}": value for name, value in error_metrics(prediction, target).items()})
    overall = error_metrics(*(torch.cat(parts) for parts in zip(*buckets.values(), strict=True)))
    metrics.update(overall)
    return metrics


def error_metrics(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    error = (prediction - target).double()
    mse = float(torch.mean(error**2))
    return dict(
        noise_mse=mse,
        noise_rmse=mse**0.5,
        noise_mae=float(torch.mean(error.abs())),
        noise_r2=float(1 - torch.sum(error**2) / torch.sum((target.double() - target.double().mean()) ** 2)),
    )


def image_grid(rows: list[list[Image.Image]], zoom: int = GRID_ZOOM) -> Image.Image:
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            grid.paste(image, (column * width, row * height))
    return grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)
