"""Flow matching (rectified flow), the objective of SD 3.x and Flux.1: a noisy latent is
x_σ = (1 - σ)·x0 + σ·ε and the denoiser predicts the velocity ε - x0.

σ is drawn the way diffusers' SD3 and Flux training scripts draw it, so a model trained here sees the noise
levels it would see there: u from `compute_density_for_timestep_sampling` (uniform, logit-normal(m, s) or
"mode"(scale)), then σ = entry ⌊u·1000⌋ of the scheduler's descending table of 1000 noise levels, shifted.
The shift moves training towards noisier levels: static (σ' = s·σ / (1 + (s - 1)·σ), SD3's 3.0), or
resolution-dependent (s = e^μ with μ from the latent's token count, `calculate_shift`, as Flux samples).
The loss weight per sample is `compute_loss_weighting_for_sd3` (none, sigma_sqrt or cosmap), applied by
schedule.weighted_mse, as DDPM's min-SNR weights are.

Timesteps handed to a denoiser are σ·1000, as diffusers' schedulers give them (a family that takes σ divides).
A fixed integer timestep t (validation, evaluation) means σ = shift(t / 1000): t = 900 is mostly noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from pipeline.core.config import FlowParams
from pipeline.diffusion.schedule import TRAIN_TIMESTEPS, NoisyBatch, training_noise

RESOLUTION_SHIFT = "resolution"  # the shift follows the image size (Flux's dynamic shifting)
SIGMA_SAMPLINGS = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow with σ sampling, a shift and loss weighting. `shift` is a number (static; 1.0 is none)
    or RESOLUTION_SHIFT, which takes its curve (base/max shift at base/max token counts) from
    `scheduler_config` (a FlowMatchEulerDiscreteScheduler config; diffusers' defaults where absent)."""

    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    shift: float | str = 1.0
    patch_size: int = 2  # latent pixels per token side: the token count of resolution-dependent shift
    scheduler_config: dict | None = None

    def __post_init__(self):
        if self.sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"flow matching: sigma sampling {self.sampling!r}: choose one of {SIGMA_SAMPLINGS}")
        if self.weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"flow matching: loss weighting {self.weighting!r}: choose one of {LOSS_WEIGHTINGS}")

    def shift_for(self, latent_shape: torch.Size) -> float:
        """The shift at this latent size: the static one, or e^μ of its token count."""
        if self.shift != RESOLUTION_SHIFT:
            return float(self.shift)
        config = {**FlowMatchEulerDiscreteScheduler().config, **(self.scheduler_config or {})}
        tokens = (latent_shape[-2] // self.patch_size) * (latent_shape[-1] // self.patch_size)
        return math.exp(calculate_shift(tokens, config["base_image_seq_len"], config["max_image_seq_len"],
                                        config["base_shift"], config["max_shift"]))

    def sigma_table(self, shift: float) -> torch.Tensor:
        """The scheduler's 1000 training noise levels, descending from 1, shifted (float32, as diffusers has it)."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=shift).sigmas

    def draw_sigmas(self, count: int, latent_shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        u = compute_density_for_timestep_sampling(self.sampling, count, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  generator=generator)
        indices = (u * TRAIN_TIMESTEPS).long()
        return self.sigma_table(self.shift_for(latent_shape))[indices]

    def sigmas_at(self, timestep: int, count: int, latent_shape: torch.Size) -> torch.Tensor:
        return shifted(torch.full((count,), timestep / TRAIN_TIMESTEPS), self.shift_for(latent_shape))

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> NoisyBatch:
        """x_σ, its timesteps, the velocity target and the loss weights of these σ (one per sample)."""
        sigmas = sigmas.to(latents.device, latents.dtype)
        expanded = sigmas.view(-1, *[1] * (latents.dim() - 1))
        weights = None if self.weighting == "none" else compute_loss_weighting_for_sd3(self.weighting, sigmas)
        return NoisyBatch((1.0 - expanded) * latents + expanded * noise, sigmas * TRAIN_TIMESTEPS,
                          noise - latents, weights)

    def training_batch(self, latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> NoisyBatch:
        """Noise, then σ, drawn from `generator` (CPU), for a training step."""
        noise = training_noise(latents.shape, generator, noise_offset).to(latents.device)
        return self.noised(latents, noise, self.draw_sigmas(len(latents), latents.shape, generator))

    def batch_at(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> NoisyBatch:
        """The batch at a fixed timestep, with given noise (validation and evaluation)."""
        return self.noised(latents, noise, self.sigmas_at(timestep, len(latents), latents.shape))

    def sampling_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """The Euler sampler of this flow: dynamic shifting (the pipeline computes μ from the image) for a
        resolution-dependent shift, else the static shift."""
        if self.shift == RESOLUTION_SHIFT:
            return FlowMatchEulerDiscreteScheduler.from_config(
                {**(self.scheduler_config or {}), "num_train_timesteps": TRAIN_TIMESTEPS},
                use_dynamic_shifting=True)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=float(self.shift))



def scheduler_shift(scheduler_config: dict) -> float | str:
    """The shift a FlowMatchEulerDiscreteScheduler config samples with: RESOLUTION_SHIFT under dynamic shifting."""
    if scheduler_config.get("use_dynamic_shifting"):
        return RESOLUTION_SHIFT
    return float(scheduler_config.get("shift", 1.0))


def flow_objective(settings: FlowParams, family_shift: float | str, patch_size: int,
                   pretrained_scheduler: dict | None) -> FlowMatching:
    """The flow `train.flow` asks for. Its shift: train.flow.shift; else a pretrained model's own scheduler's,
    so fine-tuning trains at the noise levels the model samples at; else the family's."""
    if settings.shift is not None:
        shift = settings.shift
    else:
        shift = scheduler_shift(pretrained_scheduler) if pretrained_scheduler else family_shift
    return FlowMatching(sampling=settings.sampling, logit_mean=settings.logit_mean, logit_std=settings.logit_std,
                        mode_scale=settings.mode_scale, weighting=settings.weighting, shift=shift,
                        patch_size=patch_size, scheduler_config=dict(pretrained_scheduler or {}) or None)


def flow_of(scheduler_config: dict, patch_size: int) -> FlowMatching:
    """The flow a saved pipeline's sampler config implies (validation and evaluation measure at its noise levels)."""
    return FlowMatching(shift=scheduler_shift(scheduler_config), patch_size=patch_size,
                        scheduler_config=dict(scheduler_config))
