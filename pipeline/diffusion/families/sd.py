"""Stable Diffusion 1.x / 2.x: a UNet cross-attending to one CLIP text encoder's last hidden states,
trained on DDPM's epsilon or v target (`StableDiffusionPipeline`).

Scratch sizes (`model.preset`): `tiny` trains on a laptop CPU in minutes, `small` is a starting point for a
single GPU, `sd15` has Stable Diffusion 1.5's UNet and text-encoder sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from pipeline.core.config import TrainParams
from pipeline.core.family_declarations import Declared
from pipeline.diffusion.components import clip_text_config
from pipeline.diffusion.families.base import Family, Scratch, TextComponent
from pipeline.diffusion.schedule import Ddpm, forward_process_of, training_scheduler
from pipeline.diffusion.tokenizer import build_tokenizer

DECLARED = {"name": "sd", "presets": ("tiny", "small", "sd15"), "objective": "ddpm", "latent_channels": 4,
            "patch": 1, "latents_shifted": False,
            "kohya_lora": True}


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


class StableDiffusion(Family):
    declared = Declared(**DECLARED)
    pipeline_class = StableDiffusionPipeline
    denoiser, denoiser_class = "unet", UNet2DConditionModel
    text = (TextComponent("tokenizer", "text_encoder", CLIPTextModel, AutoTokenizer),)
    conditioning = ("prompt_embeds",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_layers_argument = "unet_lora_layers"
    lora_keys_to_diffusers = True
    pipeline_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def scratch_components(self, scratch: Scratch) -> dict[str, object]:
        preset = PRESETS[scratch.preset]
        tokenizer = build_tokenizer(scratch.captions, vocab_size=scratch.vocab_size, max_tokens=preset.max_tokens)
        unet = build_unet(preset, latent_channels=scratch.latent_channels, latent_size=scratch.latent_size)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, preset.text_width, preset.text_layers,
                                                      preset.text_heads))
        return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet}

    def training_objective(self, train: TrainParams, pretrained_scheduler: dict | None) -> Ddpm:
        return Ddpm(training_scheduler(train.prediction_type, pretrained_scheduler), train.snr_gamma)

    def objective_of(self, scheduler_config: dict) -> Ddpm:
        return forward_process_of(scheduler_config)

    def encode_text(self, components: dict, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoder = components["text_encoder"]
        return {"prompt_embeds": encoder(token_ids["tokenizer"])[0]}

    def predict(self, denoiser, noisy, timesteps, conditioning, image_sizes) -> torch.Tensor:
        return denoiser(noisy, timesteps, conditioning["prompt_embeds"]).sample


FAMILY = StableDiffusion()
