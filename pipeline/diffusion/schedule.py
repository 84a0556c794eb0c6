"""The diffusion math, in one place: the noise schedule, the training target, noise and timestep draws,
min-SNR weights, and the samplers with their default settings. `Ddpm` is the objective of the DDPM
families (sd, sdxl); flow_matching.py holds the rectified-flow one, with the same interface (NoisyBatch).

train, evaluate, generate and monitor all learn or measure against these definitions, so a model is
always scored on what it was trained to predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.training_utils import compute_snr

from pipeline.core.errors import InputError

TRAIN_TIMESTEPS = 1000
# Sampling defaults: the train stage's sample grids' guidance, the defaults of `train.sample_steps`,
# `evaluate.num_inference_steps` and `evaluate.guidance_scale` (config.py) and of the served model (mlflow_model.py,
# which runs without sdpipe code); tests/test_diffusion.py checks that those copies agree.
SAMPLE_STEPS = 25
SAMPLE_GUIDANCE = 4.0

SCHEDULERS = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {"clip_sample": False}),
}


def training_scheduler(prediction_type: str = "epsilon", pretrained_config: dict | None = None) -> DDPMScheduler:
    """DDPM with Stable Diffusion's noise schedule, or with a pretrained model's own schedule."""
    if pretrained_config is not None:
        return DDPMScheduler.from_config(pretrained_config, prediction_type=prediction_type)
    # Latents are not bounded to [-1, 1]: clip_sample would ruin DDPM sampling from the saved config.
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, clip_sample=False, prediction_type=prediction_type,
    )


def sampling_scheduler(train_scheduler: DDPMScheduler) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ with the training noise schedule: good samples in 20-25 steps."""
    return DPMSolverMultistepScheduler.from_config(train_scheduler.config, algorithm_type="dpmsolver++")


DEFAULT_SCHEDULER = "dpm++"
FLOW_SAMPLER = "euler"  # a flow-matching model's one sampler: its own FlowMatchEulerDiscreteScheduler


def use_scheduler(pipeline, name: str | None) -> None:
    """Swap the sampler, keeping the model's noise schedule. None: DPM-Solver++ for DDPM models; a flow-matching
    model keeps its own Euler sampler (the DDPM samplers do not follow a flow)."""
    if isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
        if name not in (None, FLOW_SAMPLER):
            raise InputError(f"--scheduler {name!r}: a flow-matching model (sd3, flux) samples with its own "
                             f"{FLOW_SAMPLER} sampler; leave --scheduler out or pass {FLOW_SAMPLER}")
        return
    name = name or DEFAULT_SCHEDULER
    if name not in SCHEDULERS:
        raise InputError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    scheduler_class, options = SCHEDULERS[name]
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, **options)


def training_noise(shape: torch.Size, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise for a batch of latents, with an optional per-channel offset."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        # shifts each channel's mean: lets the model learn much darker or brighter images than average
        noise = noise + noise_offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise


def training_timesteps(scheduler: DDPMScheduler, count: int, generator: torch.Generator) -> torch.Tensor:
    """One timestep per sample, uniform over the training schedule."""
    return torch.randint(scheduler.config.num_train_timesteps, (count,), generator=generator)


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity for v-prediction models."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma (Hang et al. 2023): caps the weight of easy, low-noise timesteps."""
    snr = compute_snr(scheduler, timesteps)
    return snr.clamp(max=gamma) / (snr if scheduler.config.prediction_type == "epsilon" else snr + 1)


@dataclass(frozen=True)
class NoisyBatch:
    """One batch as the denoiser sees it and what its prediction is scored against."""

    noisy: torch.Tensor
    timesteps: torch.Tensor  # what the denoiser takes
    target: torch.Tensor
    weights: torch.Tensor | None  # per-sample loss weights; None: the plain mean


@dataclass(frozen=True)
class PixelWeights:
    """The masked loss's weight of every latent pixel (train.masked_loss): [n, 1, h, w], shared by the channels."""

    values: torch.Tensor
    normalize_by_area: bool  # each sample's loss sum(w * error) / sum(w) rather than mean(w * error)


def mask_weights(masks: torch.Tensor, unmasked_weight: float, normalize_by_area: bool) -> PixelWeights:
    """w = unmasked_weight + (1 - unmasked_weight) * mask: 1 on the subject (mask 1), the floor outside it."""
    return PixelWeights(unmasked_weight + (1 - unmasked_weight) * masks.float(), normalize_by_area)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                   pixels: PixelWeights | None = None) -> torch.Tensor:
    """Each sample's mean squared error (masked: weighted per latent pixel), times its loss weight (min-SNR, flow
    weighting) where there is one."""
    error = (prediction.float() - target.float()) ** 2
    if pixels is None:
        per_sample = error.flatten(1).mean(dim=1)
    else:
        w = pixels.values.to(error.device).expand_as(error)
        weighted = (w * error).flatten(1).sum(dim=1)
        # the area's mean weight per element; a sample whose weights are all 0 contributes 0, not NaN
        per_sample = weighted / (w.flatten(1).sum(dim=1).clamp(min=1e-8) if pixels.normalize_by_area
                                 else error[0].numel())
    return per_sample if weights is None else per_sample * weights.float()


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                 pixels: PixelWeights | None = None) -> torch.Tensor:
    """The loss: the plain mean squared error, or the mean of each sample's, weighted per sample and (masked loss)
    per latent pixel."""
    if weights is None and pixels is None:
        return F.mse_loss(prediction.float(), target.float())
    return per_sample_mse(prediction, target, weights, pixels).mean()


@dataclass(frozen=True)
class Ddpm:
    """DDPM: timesteps uniform over the schedule, the epsilon or v target, optional min-SNR-gamma weights."""

    scheduler: DDPMScheduler
    snr_gamma: float | None = None

    def training_batch(self, latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> NoisyBatch:
        """Noise, then timesteps, drawn from `generator` (CPU), for a training step."""
        noise = training_noise(latents.shape, generator, noise_offset).to(latents.device)
        timesteps = training_timesteps(self.scheduler, len(latents), generator).to(latents.device)
        return self.noised(latents, noise, timesteps)

    def batch_at(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> NoisyBatch:
        """The batch at a fixed timestep, with given noise (validation and evaluation)."""
        return self.noised(latents, noise, torch.full((len(latents),), timestep, dtype=torch.long,
                                                      device=latents.device))

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisyBatch:
        weights = None if self.snr_gamma is None else min_snr_weights(self.scheduler, timesteps, self.snr_gamma)
        return NoisyBatch(self.scheduler.add_noise(latents, noise, timesteps), timesteps,
                          training_target(self.scheduler, latents, noise, timesteps), weights)

    def sampling_scheduler(self) -> DPMSolverMultistepScheduler:
        return sampling_scheduler(self.scheduler)


def forward_process_of(sampler_config: dict) -> Ddpm:
    """The DDPM forward process a saved pipeline was trained with, from its sampler's config."""
    return Ddpm(DDPMScheduler.from_config(sampler_config))
