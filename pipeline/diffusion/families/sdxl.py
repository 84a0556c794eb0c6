"""Stable Diffusion XL: a UNet cross-attending to two CLIP text encoders' penultimate hidden states
(concatenated), with the second encoder's pooled projection and each image's size and crop ("time ids":
original height and width, crop top and left, target height and width) as added conditions; DDPM epsilon
or v (`StableDiffusionXLPipeline`).

The time ids come from what preprocess recorded of each image (its size before resizing and its crop), as
in diffusers' SDXL training scripts; the pipeline samples with original = target size and no crop.
Captions dropped for guidance train on the empty prompt's embeddings, so the saved pipeline encodes the
empty negative prompt too (`force_zeros_for_empty_prompt=False`) rather than using zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from pipeline.core.config import TrainParams
from pipeline.core.family_declarations import Declared
from pipeline.diffusion.components import clip_text_config
from pipeline.diffusion.families.base import Family, Scratch, TextComponent
from pipeline.diffusion.schedule import Ddpm, forward_process_of, training_scheduler
from pipeline.diffusion.tokenizer import build_tokenizer

DECLARED = {"name": "sdxl", "presets": ("tiny", "sdxl"), "objective": "ddpm", "latent_channels": 4, "patch": 1,
            "latents_shifted": False,
            "kohya_lora": True}


@dataclass(frozen=True)
class Preset:
    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    attention_heads: tuple[int, ...]
    transformer_layers: tuple[int, ...]  # per level; 0: a level without cross-attention
    time_embed_dim: int  # per time id
    text_width: int  # CLIP-L-like encoder
    text_layers: int
    text_heads: int
    text_2_width: int  # OpenCLIP-bigG-like encoder, with a projection of the same width
    text_2_layers: int
    text_2_heads: int
    max_tokens: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset((64, 128), 1, (4, 4), (1, 1), 8, 32, 2, 4, 32, 2, 4, 24),
    "sdxl": Preset((320, 640, 1280), 2, (5, 10, 20), (0, 2, 10), 256, 768, 12, 12, 1280, 32, 20, 77),
}


def build_unet(preset: Preset, *, latent_channels: int, latent_size: int) -> UNet2DConditionModel:
    cross = [layers > 0 for layers in preset.transformer_layers]
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
        block_out_channels=preset.unet_channels, layers_per_block=preset.unet_layers_per_block,
        attention_head_dim=preset.attention_heads,
        transformer_layers_per_block=tuple(max(1, layers) for layers in preset.transformer_layers),
        use_linear_projection=True, cross_attention_dim=preset.text_width + preset.text_2_width,
        addition_embed_type="text_time", addition_time_embed_dim=preset.time_embed_dim,
        projection_class_embeddings_input_dim=6 * preset.time_embed_dim + preset.text_2_width,
        norm_num_groups=min(32, min(preset.unet_channels)),
    )


class StableDiffusionXL(Family):
    declared = Declared(**DECLARED)
    pipeline_class = StableDiffusionXLPipeline
    denoiser, denoiser_class = "unet", UNet2DConditionModel
    text = (TextComponent("tokenizer", "text_encoder", CLIPTextModel, AutoTokenizer),
            TextComponent("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection, AutoTokenizer))
    conditioning = ("prompt_embeds", "pooled_prompt_embeds")
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    lora_layers_argument = "unet_lora_layers"
    lora_keys_to_diffusers = True
    pipeline_options = {"force_zeros_for_empty_prompt": False}
    vae_in_fp32 = True  # "The VAE is always in float32 to avoid NaN losses" (diffusers' SDXL scripts)

    def scratch_components(self, scratch: Scratch) -> dict[str, object]:
        preset = PRESETS[scratch.preset]
        tokenizer = build_tokenizer(scratch.captions, vocab_size=scratch.vocab_size, max_tokens=preset.max_tokens)
        unet = build_unet(preset, latent_channels=scratch.latent_channels, latent_size=scratch.latent_size)
        first = CLIPTextModel(clip_text_config(tokenizer, preset.text_width, preset.text_layers, preset.text_heads))
        second = CLIPTextModelWithProjection(clip_text_config(
            tokenizer, preset.text_2_width, preset.text_2_layers, preset.text_2_heads, projection_dim=preset.text_2_width))
        return {"tokenizer": tokenizer, "tokenizer_2": tokenizer, "text_encoder": first, "text_encoder_2": second,
                "unet": unet}

    def training_objective(self, train: TrainParams, pretrained_scheduler: dict | None) -> Ddpm:
        return Ddpm(training_scheduler(train.prediction_type, pretrained_scheduler), train.snr_gamma)

    def objective_of(self, scheduler_config: dict) -> Ddpm:
        return forward_process_of(scheduler_config)

    def encode_text(self, components: dict, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = components["text_encoder"](token_ids["tokenizer"], output_hidden_states=True)
        second = components["text_encoder_2"](token_ids["tokenizer_2"], output_hidden_states=True)
        return {"prompt_embeds": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
                "pooled_prompt_embeds": second.text_embeds}

    def predict(self, denoiser, noisy, timesteps, conditioning, image_sizes) -> torch.Tensor:
        added = {"text_embeds": conditioning["pooled_prompt_embeds"],
                 "time_ids": image_sizes.to(noisy.device, conditioning["prompt_embeds"].dtype)}
        return denoiser(noisy, timesteps, conditioning["prompt_embeds"], added_cond_kwargs=added).sample


FAMILY = StableDiffusionXL()
