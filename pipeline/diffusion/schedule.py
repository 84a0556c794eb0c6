"""The diffusion math, in one place: the noise schedule, the training target, noise and timestep draws,
min-SNR weights, and the samplers with their default settings.

train, evaluate, generate and monitor all learn or measure against these definitions, so a model is
always scored on what it was trained to predict.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.training_utils import compute_snr

TRAIN_TIMESTEPS = 1000
# Sampling defaults: the train stage's sample grids and the default of `evaluate.num_inference_steps` /
# `evaluate.guidance_scale` (config.py) and of the served model (mlflow_model.py, which runs without sdpipe
# code); tests/test_diffusion.py checks that those copies agree.
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


def use_scheduler(pipeline, name: str) -> None:
    """Swap the sampler, keeping the model's noise schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
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
