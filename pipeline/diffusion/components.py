"""Build or load the Stable Diffusion components: CLIP text encoder, VAE, UNet, schedulers, the pipeline.

Scratch sizes come from named presets (`model.preset`): `tiny` trains on a laptop CPU in minutes, `small`
is a starting point for a single GPU, `sd15` has Stable Diffusion 1.5's UNet and text-encoder sizes.
Fine-tuning loads the components of a pretrained diffusers model (`model.pretrained`: a folder or a hub
id). Everything is a plain diffusers/transformers object, saved with `save_pretrained` and loadable with
no sdpipe code. Scratch mode's tokenizer is pipeline.diffusion.tokenizer's; pixels to latents, vae_io's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

from pipeline.core.config import ConfigError, VaeParams
from pipeline.diffusion.schedule import training_scheduler
from pipeline.diffusion.tokenizer import build_tokenizer
from pipeline.runtime.device import compute_device


@dataclass(frozen=True)
class Preset:
    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    attention_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    max_tokens: int
    attention_levels: int  # UNet levels, from the top, with cross-attention


PRESETS: dict[str, Preset] = {
    "tiny": Preset((64, 128), 1, 4, 64, 2, 4, 24, 2),
    "small": Preset((128, 256, 512), 2, 8, 256, 4, 4, 77, 3),
    "sd15": Preset((320, 640, 1280, 1280), 2, 8, 768, 12, 12, 77, 3),
}
PIPELINE_INDEX = "model_index.json"


def build_text_encoder(tokenizer: CLIPTokenizerFast, preset: Preset) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_width,
        intermediate_size=preset.text_width * 4,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        max_position_embeddings=preset.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae(params: VaeParams, resolution: int) -> AutoencoderKL:
    levels = len(params.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=params.block_out_channels,
        layers_per_block=1,
        latent_channels=params.latent_channels,
        norm_num_groups=min(8, min(params.block_out_channels)),
        sample_size=resolution,
    )


def build_unet(preset: Preset, *, latent_channels: int, latent_size: int) -> UNet2DConditionModel:
    attention, plain = preset.attention_levels, len(preset.unet_channels) - preset.attention_levels
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * attention + ("DownBlock2D",) * plain,
        up_block_types=("UpBlock2D",) * plain + ("CrossAttnUpBlock2D",) * attention,
        block_out_channels=preset.unet_channels,
        layers_per_block=preset.unet_layers_per_block,
        cross_attention_dim=preset.text_width,
        attention_head_dim=preset.attention_heads,
        norm_num_groups=min(32, min(preset.unet_channels)),
    )


def pretrained_location(spec: str, root: Path) -> str:
    """`model.pretrained` as from_pretrained takes it: a diffusers folder (relative to the project root unless
    absolute), else a hub id, which must already be in the Hugging Face cache when the hub is offline."""
    folder = (Path(root) / Path(spec).expanduser()).resolve()
    if folder.is_dir():
        if not (folder / PIPELINE_INDEX).is_file():
            raise ConfigError(f"model.pretrained: {folder} is not a diffusers folder (no {PIPELINE_INDEX})")
        return str(folder)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ConfigError(f"model.pretrained: {spec!r} is neither a folder here nor a hub id like owner/name")
    return spec


def load_pretrained(spec: str, root: Path, component: str, loader):
    """One component (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`) of a pretrained model."""
    location = pretrained_location(spec, root)
    try:
        return loader(location, subfolder=component)
    except (OSError, ValueError) as error:
        where = (f"there is no folder {Path(root).resolve() / spec}, and as a hub id it needs the network or the "
                 "Hugging Face cache (the Makefile sets HF_HUB_OFFLINE=1; unset it to download)"
                 if location == spec else f"the folder {location} lacks it")
        raise ConfigError(f"model.pretrained: cannot load {component} of {spec!r}: {where} ({error})") from None


def load_pretrained_vae(spec: str, root: Path) -> AutoencoderKL:
    return load_pretrained(spec, root, "vae", AutoencoderKL.from_pretrained)


def load_pretrained_unet(spec: str, root: Path) -> UNet2DConditionModel:
    return load_pretrained(spec, root, "unet", UNet2DConditionModel.from_pretrained)


def load_frozen_text_encoder(spec: str, root: Path) -> tuple[object, CLIPTextModel]:
    """The tokenizer and the text encoder, in eval mode with gradients off."""
    tokenizer = load_pretrained(spec, root, "tokenizer", AutoTokenizer.from_pretrained)
    text_encoder = load_pretrained(spec, root, "text_encoder", CLIPTextModel.from_pretrained)
    return tokenizer, text_encoder.eval().requires_grad_(False)


def pretrained_scheduler_config(spec: str, root: Path) -> dict:
    return dict(load_pretrained(spec, root, "scheduler", DDPMScheduler.load_config))


def random_pipeline(captions: Iterable[str], *, preset: str = "tiny", vae: VaeParams = VaeParams(),
                    resolution: int = 32, vocab_size: int = 1000) -> StableDiffusionPipeline:
    """A randomly initialised Stable Diffusion pipeline from a preset. Saved with save_pretrained it has the
    files and layout of real weights such as SD 1.5: the stand-in for them in tests and benchmarks."""
    sizes = PRESETS[preset]
    tokenizer = build_tokenizer(captions, vocab_size=vocab_size, max_tokens=sizes.max_tokens)
    autoencoder = build_vae(vae, resolution)
    latent_size = resolution // 2 ** (len(vae.block_out_channels) - 1)
    return StableDiffusionPipeline(
        vae=autoencoder, text_encoder=build_text_encoder(tokenizer, sizes), tokenizer=tokenizer,
        unet=build_unet(sizes, latent_channels=vae.latent_channels, latent_size=latent_size),
        scheduler=training_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_pipeline(folder) -> StableDiffusionPipeline:
    """A saved pipeline on the compute device (sampling stays deterministic: seeds drive CPU generators)."""
    pipeline = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(compute_device())


