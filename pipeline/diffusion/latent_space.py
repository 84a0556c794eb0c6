"""The space a family's denoiser works in: its VAE's class and how the VAE's latents are normalised for it.

Each family declares one (`Family.latent_space`); the vae stage builds and fits the scratch VAE through it,
train and the noise metrics turn cached VAE latents into the denoiser's input with it, and every loader of a
VAE folder takes the class the folder names. The pipelines undo the same normalisation before decoding, so a
space's `to_denoiser` is the inverse of what its pipeline does to sampled latents.

- `ScaledLatents` (`AutoencoderKL`: sd, sdxl, sd3, flux, chroma): `(z - shift_factor) * scaling_factor`, both in
  the VAE's config; SD's VAEs have no shift (`shifted=False`), SD3's and Flux.1's do.
- `PatchNormalisedLatents` (`AutoencoderKLFlux2`: flux2): 2x2 latent patches folded into channels, (C, H, W) ->
  (4C, H/2, W/2), each channel standardised by the VAE's BatchNorm running mean and variance (`vae.bn`'s buffers,
  saved with its weights, not in its config), as Flux2KleinPipeline does. A freshly built one has mean 0 and
  variance 1: scratch mode fits them to the training images' latents.
- `FrameLatents` (`AutoencoderKLQwenImage`: qwenimage): a video VAE (causal 3-D convolutions over
  (N, C, frames, H, W)) that sees an image as one frame; `posterior` and `decoded` add and take off that frames
  dimension, so everything else handles its latents as (N, C, H, W). Each channel is standardised by the VAE
  config's per-channel `latents_mean` and `latents_std`, `(z - mean) / std`, as QwenImageImg2ImgPipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, Flux2KleinPipeline, ModelMixin
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from pipeline.core.config import VaeParams

# random stand-ins' latent statistics for the spaces that have a shift: like the released ones (Flux.1's VAE),
# nonzero and not 1, so a test sees a conversion that leaves out the shift or the scale
STAND_IN_LATENT_SHIFT, STAND_IN_LATENT_SCALE = 0.1159, 0.3611


def vae_architecture(params: VaeParams, resolution: int, latent_channels: int) -> dict:
    """The scratch VAE's layers: one down and one up block per level of `vae.block_out_channels`."""
    levels = len(params.block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=params.block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(8, min(params.block_out_channels)),
        sample_size=resolution,
    )


@dataclass(frozen=True)
class ScaledLatents:
    """Latents shifted by the VAE config's `shift_factor` (when `shifted`) and scaled by its `scaling_factor`."""

    shifted: bool
    vae_class: type[ModelMixin] = AutoencoderKL
    patch: int = 1  # VAE latent pixels per side folded into one pixel of the denoiser's input

    def build_vae(self, params: VaeParams, resolution: int, latent_channels: int) -> AutoencoderKL:
        return self.vae_class(**vae_architecture(params, resolution, latent_channels))

    def to_denoiser(self, latents: torch.Tensor, vae) -> torch.Tensor:
        config = vae.config
        if config.get("shift_factor") is not None:
            latents = latents - config["shift_factor"]
        return latents * config["scaling_factor"]

    def fit(self, vae, posteriors: list[Posteriors]) -> None:
        """scaling_factor 1 / std (unit variance) and, when shifted, shift_factor the mean (zero mean), of the
        posterior means. The std is about the mean either way, so the scale is the same with or without the shift.
        One number for all channels, so no channel's posterior noise is scaled up beyond the others'."""
        values = torch.cat([batch.mean.float().flatten() for batch in posteriors])
        mean, std = float(values.mean()), float(values.std())
        vae.register_to_config(scaling_factor=1.0 / std, **({"shift_factor": mean} if self.shifted else {}))

    def stand_in(self, vae) -> None:
        if self.shifted:
            vae.register_to_config(shift_factor=STAND_IN_LATENT_SHIFT, scaling_factor=STAND_IN_LATENT_SCALE)

    def statistics(self, vae) -> dict[str, float]:
        """What metrics/vae.json records of the normalisation."""
        shift = vae.config.get("shift_factor")
        return {"scaling_factor": vae.config.scaling_factor, **({"shift_factor": shift} if shift is not None else {})}


@dataclass(frozen=True)
class Posteriors:
    """A batch of the VAE's posteriors, (N, C, H, W) each: training draws its latents as mean + std * noise."""

    mean: torch.Tensor
    std: torch.Tensor


def sampled_moments(posteriors: list[Posteriors]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's mean and variance of the latents training draws (mean + std * noise): the means' variance
    plus the posterior's. Standardised by the means' variance alone, a channel the VAE barely uses (means nearly
    constant, posterior std near 1) would be scaled up until its noise drowned the others: on the tiny flux2 VAE
    the denoiser's input had a std of 2.8, and the model reached adherence 0.27."""
    channels = posteriors[0].mean.shape[1]
    means = torch.cat([batch.mean.float().transpose(0, 1).reshape(channels, -1) for batch in posteriors], dim=1)
    spreads = torch.cat([batch.std.float().transpose(0, 1).reshape(channels, -1) for batch in posteriors], dim=1)
    return means.mean(dim=1), means.var(dim=1) + spreads.square().mean(dim=1)


def patchified(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2), each channel's 2x2 patch in channel order, as the pipeline folds them."""
    return Flux2KleinPipeline._patchify_latents(latents)


@dataclass(frozen=True)
class PatchNormalisedLatents:
    """2x2-patchified latents standardised per channel by the VAE's BatchNorm running statistics."""

    vae_class: type[ModelMixin] = AutoencoderKLFlux2
    patch: int = 2  # VAE latent pixels per side folded into one pixel of the denoiser's input

    def build_vae(self, params: VaeParams, resolution: int, latent_channels: int) -> AutoencoderKLFlux2:
        return self.vae_class(**vae_architecture(params, resolution, latent_channels))

    def to_denoiser(self, latents: torch.Tensor, vae) -> torch.Tensor:
        mean, std = self.moments(vae, latents)
        return (patchified(latents) - mean) / std

    @staticmethod
    def moments(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel mean and std, shaped to broadcast over (N, 4C, h, w), on `like`'s device and dtype."""
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def fit(self, vae, posteriors: list[Posteriors]) -> None:
        """Running mean and variance the patch channels' own over the latents training samples (their BatchNorm's
        buffers, in place of the momentum average a BatchNorm would keep while training); `sampled_moments` says
        why of samples, not of means."""
        mean, variance = sampled_moments([Posteriors(patchified(batch.mean), patchified(batch.std))
                                          for batch in posteriors])
        with torch.no_grad():
            vae.bn.running_mean.copy_(mean)
            vae.bn.running_var.copy_(variance)

    def stand_in(self, vae) -> None:
        with torch.no_grad():
            vae.bn.running_mean.fill_(STAND_IN_LATENT_SHIFT)
            vae.bn.running_var.fill_(1 / STAND_IN_LATENT_SCALE**2)

    def statistics(self, vae) -> dict[str, float]:
        """The patch channels' average mean and std (metrics/vae.json; the per-channel values are in the VAE)."""
        return {"latent_mean": float(vae.bn.running_mean.mean()),
                "latent_std": float(vae.bn.running_var.add(vae.config.batch_norm_eps).sqrt().mean())}


@dataclass(frozen=True)
class FrameLatents:
    """One-frame latents of a video VAE, standardised per channel by its config's latents_mean/latents_std."""

    vae_class: type[ModelMixin] = AutoencoderKLQwenImage
    patch: int = 1  # VAE latent pixels per side folded into one pixel of the denoiser's input

    def build_vae(self, params: VaeParams, resolution: int, latent_channels: int) -> AutoencoderKLQwenImage:
        """One level per entry of `vae.block_out_channels`, as for the other VAEs; the channels are multiples of
        the first (the VAE's `dim_mult`), and no level downsamples time (an image is one frame)."""
        base = params.block_out_channels[0]
        if any(channels % base for channels in params.block_out_channels):
            raise ValueError(f"vae.block_out_channels: {list(params.block_out_channels)}: {self.vae_class.__name__} "
                             f"takes channels that are multiples of the first ({base})")
        levels = len(params.block_out_channels)
        return self.vae_class(base_dim=base, z_dim=latent_channels, num_res_blocks=1,
                              dim_mult=[channels // base for channels in params.block_out_channels],
                              temperal_downsample=[False] * (levels - 1), latents_mean=[0.0] * latent_channels,
                              latents_std=[1.0] * latent_channels)

    def to_denoiser(self, latents: torch.Tensor, vae) -> torch.Tensor:
        mean, std = self.moments(vae, latents)
        return (latents - mean) / std

    @staticmethod
    def moments(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel mean and std, shaped to broadcast over (N, C, H, W), on `like`'s device and dtype."""
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def fit(self, vae, posteriors: list[Posteriors]) -> None:
        """latents_mean and latents_std each channel's own over the latents training samples (`sampled_moments`)."""
        mean, variance = sampled_moments(posteriors)
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=variance.sqrt().tolist())

    def stand_in(self, vae) -> None:
        """A different mean and std per channel, so a test sees a conversion that mixes up the channels."""
        channels = torch.arange(vae.config.z_dim, dtype=torch.float64)
        vae.register_to_config(latents_mean=(STAND_IN_LATENT_SHIFT + 0.05 * channels).tolist(),
                               latents_std=((1 + 0.1 * channels) / STAND_IN_LATENT_SCALE).tolist())

    def statistics(self, vae) -> dict[str, float]:
        """The channels' average mean and std (metrics/vae.json; the per-channel values are in the VAE's config)."""
        return {"latent_mean": float(torch.tensor(vae.config.latents_mean).mean()),
                "latent_std": float(torch.tensor(vae.config.latents_std).mean())}


LatentSpace = ScaledLatents | PatchNormalisedLatents | FrameLatents
VAE_CLASSES = {vae_class.__name__: vae_class for vae_class in (AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage)}
FRAME_VAES = (AutoencoderKLQwenImage,)  # VAEs of (N, C, frames, H, W), fed an image as one frame


def posterior(vae, images: torch.Tensor) -> DiagonalGaussianDistribution:
    """The VAE's posterior of (N, 3, H, W) images, over (N, C, h, w) latents whatever the VAE's layout."""
    if not isinstance(vae, FRAME_VAES):
        return vae.encode(images).latent_dist
    return DiagonalGaussianDistribution(vae.encode(images.unsqueeze(2)).latent_dist.parameters.squeeze(2))


def decoded(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's (N, 3, H, W) images of (N, C, h, w) latents."""
    if not isinstance(vae, FRAME_VAES):
        return vae.decode(latents).sample
    return vae.decode(latents.unsqueeze(2)).sample.squeeze(2)


def vae_class_of(config: dict, where: str) -> type[ModelMixin]:
    """The VAE class a saved VAE's config names."""
    name = config.get("_class_name")
    if name not in VAE_CLASSES:
        raise ValueError(f"{where}: the VAE class {name!r} is none sdpipe reads ({', '.join(VAE_CLASSES)})")
    return VAE_CLASSES[name]


def load_vae(folder, **options) -> ModelMixin:
    """A saved VAE folder (models/vae) as the class its config names; `options` go to from_pretrained."""
    return vae_class_of(AutoencoderKL.load_config(folder), str(folder)).from_pretrained(folder, **options)
