"""The noise-prediction errors every model is scored on, per timestep: train's validation loss and
evaluate's noise metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from diffusers import DiffusionPipeline

from pipeline.contracts.latents import MappedRows
from pipeline.diffusion.families import family_of_pipeline

NOISE_METRICS_BATCH = 64  # samples per denoiser call: the validation split never has to fit in memory at once
TextStates = Callable[[np.ndarray], dict[str, torch.Tensor]]  # rows -> their cached text states, by name


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
    pipeline: DiffusionPipeline, latent_means: torch.Tensor | MappedRows, captions: list[str],
    timesteps: tuple[int, ...], noise_seed: int, batch_size: int = NOISE_METRICS_BATCH,
    text_states: TextStates | None = None,
) -> dict:
    """Prediction errors on given VAE latent means at fixed timesteps and noise seeds. The target is what the
    model was trained to predict: the noise, the velocity of v-prediction, or the flow's velocity, as the
    forward process its family's sampler config implies.

    Measured on the first len(captions) rows of `latent_means`, a tensor or the mapped rows of a latent
    file, read `batch_size` at a time (train: train.batch_size, what fits its memory); each timestep's noise comes
    from its own generator, drawn batch after batch in sample order. The captions' conditioning comes from the
    pipeline's text encoders, or from `text_states` (train in finetune mode: the states encode cached, as training
    used them, with no text encoder loaded). Size conditions (SDXL) are those of the square images the pipeline
    generates."""
    family = family_of_pipeline(pipeline)
    denoiser = getattr(pipeline, family.denoiser)
    device = denoiser.device
    objective = family.objective_of(pipeline.scheduler.config)
    generators = {timestep: torch.Generator().manual_seed(noise_seed + timestep) for timestep in timesteps}
    sums = {timestep: ErrorSums() for timestep in timesteps}
    for start in range(0, len(captions), batch_size):
        rows = np.arange(start, min(start + batch_size, len(captions)))
        latents = family.latent_space.to_denoiser(latent_means[rows].float().to(device), pipeline.vae)
        if text_states is None:
            ids = family.token_ids(pipeline.components, [captions[row] for row in rows])
            states = family.encode_text(pipeline.components, {name: value.to(device) for name, value in ids.items()})
        else:
            states = {name: value.to(device, torch.float32) for name, value in text_states(rows).items()}
        sizes = square_image_sizes(len(latents), latents.shape[-1] * pipeline.vae_scale_factor)
        for timestep in timesteps:
            noise = torch.randn(latents.shape, generator=generators[timestep]).to(device)
            batch = objective.batch_at(latents, noise, timestep)
            prediction = family.predict(denoiser, batch.noisy, batch.timesteps, states, sizes)
            sums[timestep].add(prediction.cpu(), batch.target.cpu())
    metrics, overall = {}, ErrorSums()
    for timestep, sum_of_timestep in sums.items():
        metrics.update({f"{name}_t{timestep}": value for name, value in sum_of_timestep.metrics().items()})
        overall += sum_of_timestep
    return metrics | overall.metrics()


def square_image_sizes(count: int, side: int) -> torch.Tensor:
    """Size conditions of uncropped square images: original size, crop top-left (0, 0), target size."""
    return torch.tensor([[side, side, 0, 0, side, side]] * count, dtype=torch.float32)
