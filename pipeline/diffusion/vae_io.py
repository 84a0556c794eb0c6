"""Pixels to latents and back through a VAE: the model's input range, posterior moments, reconstructions (the
space the denoiser works in is pipeline.diffusion.latent_space's)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range diffusers' VAEs expect."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of CPU images, computed where the VAE is and returned on the CPU."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size].to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


BATCH_PIXELS = 2**22  # images per VAE pass outside training: 4,096 at 32 px, 16 at 512 px


def device_batches(images: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """CPU images in slices of about BATCH_PIXELS pixels, moved to where the network runs."""
    size = max(1, BATCH_PIXELS // (images.shape[-2] * images.shape[-1]))
    for start in range(0, len(images), size):
        yield images[start : start + size].to(device, dtype)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstructions (of the posterior means) of CPU images in [-1, 1], clamped, on the CPU."""
    return torch.cat([vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1).float().cpu()
                      for batch in device_batches(images, vae.device, vae.dtype)])
