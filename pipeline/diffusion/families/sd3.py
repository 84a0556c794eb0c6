"""Stable Diffusion 3 / 3.5: an MMDiT transformer (`SD3Transformer2DModel`) attending jointly to the image
tokens and a text sequence: two CLIP encoders' penultimate hidden states (concatenated, zero-padded to T5's
width) followed by T5's states; the two CLIPs' pooled projections (concatenated) condition every block.
Trained by flow matching (pipeline/diffusion/flow_matching.py) with SD3's static shift 3.0 by default, and
sampled with the flow's Euler sampler (`StableDiffusion3Pipeline`).

T5 reads `model.max_sequence_length` tokens per caption: its tokenizer is saved with that length and every
sampler call passes it on, so sampling sees the sequence training saw.

Scratch sizes (`model.preset`): `tiny` trains on a CPU; `sd35_medium` and `sd35_large` have SD 3.5 Medium's
(MMDiT-X, dual attention in its first 13 blocks) and Large's transformer and text-encoder sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from pipeline.core.config import TrainParams
from pipeline.core.family_declarations import Declared
from pipeline.diffusion.components import clip_text_config, t5_encoder_config
from pipeline.diffusion.families.base import Family, Scratch, TextComponent
from pipeline.diffusion.flow_matching import FlowMatching, flow_objective, flow_of
from pipeline.diffusion.tokenizer import build_t5_tokenizer, build_tokenizer

DECLARED = {"name": "sd3", "presets": ("tiny", "sd35_medium", "sd35_large"), "objective": "flow",
            "latent_channels": 16, "patch": 2, "latents_shifted": True}

SHIFT = 3.0  # SD3's sampler and training scripts at 1024 px
PATCH = DECLARED["patch"]  # latent pixels per token side, as in SD3 (a resolution-dependent shift counts these tokens)


@dataclass(frozen=True)
class Preset:
    layers: int
    heads: int
    head_dim: int
    dual_attention_layers: tuple[int, ...]  # SD 3.5 Medium's MMDiT-X blocks
    qk_norm: str | None
    position_embedding_size: int  # latent patches per side the position embedding covers
    clip_width: int  # CLIP-L-like; its projection has the same width
    clip_layers: int
    clip_heads: int
    clip_2_width: int  # OpenCLIP-bigG-like
    clip_2_layers: int
    clip_2_heads: int
    max_tokens: int  # the CLIP tokenizers' fixed length
    t5_width: int
    t5_layers: int
    t5_heads: int
    t5_feed_forward: int


CLIP_L, CLIP_G = (768, 12, 12), (1280, 32, 20)
T5_XXL = (4096, 24, 64, 10240)
PRESETS: dict[str, Preset] = {
    "tiny": Preset(4, 4, 32, (), None, 16, 32, 2, 4, 32, 2, 4, 24, 64, 2, 4, 128),
    "sd35_medium": Preset(24, 24, 64, tuple(range(13)), "rms_norm", 384, *CLIP_L, *CLIP_G, 77, *T5_XXL),
    "sd35_large": Preset(38, 38, 64, (), "rms_norm", 192, *CLIP_L, *CLIP_G, 77, *T5_XXL),
}


def build_transformer(preset: Preset, *, latent_channels: int, latent_size: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=PATCH,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=preset.layers,
        attention_head_dim=preset.head_dim,
        num_attention_heads=preset.heads,
        joint_attention_dim=preset.t5_width,
        caption_projection_dim=preset.heads * preset.head_dim,
        pooled_projection_dim=preset.clip_width + preset.clip_2_width,
        pos_embed_max_size=max(preset.position_embedding_size, latent_size // PATCH),
        dual_attention_layers=preset.dual_attention_layers,
        qk_norm=preset.qk_norm,
    )


class StableDiffusion3(Family):
    declared = Declared(**DECLARED)
    pipeline_class = StableDiffusion3Pipeline
    denoiser, denoiser_class = "transformer", SD3Transformer2DModel
    text = (TextComponent("tokenizer", "text_encoder", CLIPTextModelWithProjection, AutoTokenizer),
            TextComponent("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection, AutoTokenizer),
            TextComponent("tokenizer_3", "text_encoder_3", T5EncoderModel, AutoTokenizer,
                          sequence_length_is_a_param=True))
    conditioning = ("prompt_embeds", "pooled_prompt_embeds")
    # diffusers' train_dreambooth_lora_sd3.py
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
    lora_layers_argument = "transformer_lora_layers"

    def scratch_components(self, scratch: Scratch) -> dict[str, object]:
        preset = PRESETS[scratch.preset]
        clip_tokenizer = build_tokenizer(scratch.captions, vocab_size=scratch.vocab_size, max_tokens=preset.max_tokens)
        t5_tokenizer = build_t5_tokenizer(scratch.captions, vocab_size=scratch.vocab_size,
                                          max_tokens=scratch.max_sequence_length)
        first = CLIPTextModelWithProjection(clip_text_config(
            clip_tokenizer, preset.clip_width, preset.clip_layers, preset.clip_heads, projection_dim=preset.clip_width))
        second = CLIPTextModelWithProjection(clip_text_config(
            clip_tokenizer, preset.clip_2_width, preset.clip_2_layers, preset.clip_2_heads,
            projection_dim=preset.clip_2_width))
        t5 = T5EncoderModel(t5_encoder_config(t5_tokenizer, preset.t5_width, preset.t5_layers, preset.t5_heads,
                                              preset.t5_feed_forward, dropout=0.0))
        transformer = build_transformer(preset, latent_channels=scratch.latent_channels,
                                        latent_size=scratch.latent_size)
        return {"tokenizer": clip_tokenizer, "tokenizer_2": clip_tokenizer, "tokenizer_3": t5_tokenizer,
                "text_encoder": first, "text_encoder_2": second, "text_encoder_3": t5, "transformer": transformer}

    def training_objective(self, train: TrainParams, pretrained_scheduler: dict | None) -> FlowMatching:
        return flow_objective(train.flow, SHIFT, patch_size=PATCH, pretrained_scheduler=pretrained_scheduler)

    def objective_of(self, scheduler_config: dict) -> FlowMatching:
        return flow_of(scheduler_config, patch_size=PATCH)

    def encode_text(self, components: dict, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = components["text_encoder"](token_ids["tokenizer"], output_hidden_states=True)
        second = components["text_encoder_2"](token_ids["tokenizer_2"], output_hidden_states=True)
        t5 = components["text_encoder_3"](token_ids["tokenizer_3"])[0]
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2),
                "pooled_prompt_embeds": torch.cat([first.text_embeds, second.text_embeds], dim=-1)}

    def predict(self, denoiser, noisy, timesteps, conditioning, image_sizes) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=conditioning["prompt_embeds"],
                        pooled_projections=conditioning["pooled_prompt_embeds"]).sample

    def sampling_arguments(self, pipeline, prompts, guidance_scale, negative_prompt=None) -> dict:
        return {**super().sampling_arguments(pipeline, prompts, guidance_scale, negative_prompt),
                "max_sequence_length": pipeline.tokenizer_3.model_max_length}


FAMILY = StableDiffusion3()
