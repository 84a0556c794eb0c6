"""The noise-prediction errors every model is scored on, per timestep: train's validation loss and
evaluate's noise metrics."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from pipeline.contracts.latents import MappedRows
from pipeline.diffusion.schedule import training_target
from pipeline.diffusion.tokenizer import tokenize

NOISE_METRICS_BATCH = 64  # samples per UNet call: the validation split never has to fit in memory at once


@dataclass
class ErrorSums:
    """Running sums of a prediction's errors, from which its MSE, MAE and R² follow."""

    count: int = 0
    squared_error: float = 0.0
    absolute_error: float = 0.0
    target: float = 0.0
    squared_target: float = 0.0

    def add(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        error, target = (prediction - target).double(), target.double()
        self.count += error.numel()
        self.squared_error += float(torch.sum(error**2))
        self.absolute_error += float(torch.sum(error.abs()))
        self.target += float(torch.sum(target))
        self.squared_target += float(torch.sum(target**2))

    def __iadd__(self, other: ErrorSums) -> ErrorSums:
        for name in (field.name for field in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def metrics(self) -> dict[str, float]:
        mse = self.squared_error / self.count
        target_variance_sum = self.squared_target - self.target**2 / self.count
        return dict(noise_mse=mse, noise_rmse=mse**0.5, noise_mae=self.absolute_error / self.count,
                    noise_r2=1 - self.squared_error / target_variance_sum)


@torch.no_grad()
def noise_metrics_on(
    pipeline: StableDiffusionPipeline, latent_means: torch.Tensor | MappedRows, captions: list[str],
    timesteps: tuple[int, ...], noise_seed: int, batch_size: int = NOISE_METRICS_BATCH,
) -> dict:
    """Prediction errors on given VAE latent means at fixed timesteps and noise seeds. The target is
    what the model was trained to predict: the noise, or the velocity for v-prediction models.

    Measured on the first len(captions) rows of `latent_means`, a tensor or the mapped rows of a latent
    file, read `batch_size` at a time; each timestep's noise comes from its own generator, drawn batch after
    batch in sample order."""
    device = pipeline.unet.device
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)  # the forward process used in training
    generators = {timestep: torch.Generator().manual_seed(noise_seed + timestep) for timestep in timesteps}
    sums = {timestep: ErrorSums() for timestep in timesteps}
    for start in range(0, len(captions), batch_size):
        stop = min(start + batch_size, len(captions))
        latents = latent_means[np.arange(start, stop)].float().to(device) * pipeline.vae.config.scaling_factor
        states = pipeline.text_encoder(tokenize(pipeline.tokenizer, captions[start:stop]).to(device))[0]
        for timestep in timesteps:
            noise = torch.randn(latents.shape, generator=generators[timestep]).to(device)
            steps = torch.full((len(latents),), timestep, dtype=torch.long, device=device)
            prediction = pipeline.unet(scheduler.add_noise(latents, noise, steps), steps, states).sample
            sums[timestep].add(prediction.cpu(), training_target(scheduler, latents, noise, steps).cpu())
    metrics, overall = {}, ErrorSums()
    for timestep, sum_of_timestep in sums.items():
        metrics.update({f"{name}_t{timestep}": value for name, value in sum_of_timestep.metrics().items()})
        overall += sum_of_timestep
    return metrics | overall.metrics()


