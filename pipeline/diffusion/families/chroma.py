"""Chroma (Chroma1-Base and -HD): Flux.1's transformer with its modulation computed by one small network
from σ alone (`ChromaTransformer2DModel`: the "approximator"; no CLIP, no pooled text, no guidance embedding),
over Flux's 2x2-packed latents and rotary image ids. It attends to T5's states only. Trained by flow matching
(pipeline/diffusion/flow_matching.py) with Flux's resolution-dependent shift, the curve ChromaPipeline samples
with; the transformer takes σ (the timestep / 1000), as the pipeline passes it (`ChromaPipeline`).

- Masks: T5 reads the tokenizer's attention mask (unlike Flux's), and the transformer attends to the caption's
  tokens and exactly one padding token, masking the rest (lodestones' model card; diffusers #11724, kohya
  sd-scripts #2163). Encode caches that transformer mask beside T5's states (`prompt_attention_mask`), and
  sampling from cached states passes it as the pipeline's argument of that name.
- Guidance: true classifier-free guidance against the empty prompt (ChromaPipeline's default negative), which
  caption dropout trains.
- T5 reads `model.max_sequence_length` tokens, saved as its tokenizer's length and passed to every sampler call.

Scratch sizes (`model.preset`): `tiny` trains on a CPU (diffusers' test config, widened to Flux's tiny
preset); `chroma1` has Chroma1's transformer (Flux.1's 19 double and 38 single blocks, the approximator's
64 channels, 5 layers of width 5120) and T5-XXL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from transformers import AutoTokenizer, T5EncoderModel

from pipeline.core.config import TrainParams
from pipeline.core.family_declarations import Declared
from pipeline.diffusion.components import t5_encoder_config
from pipeline.diffusion.families.base import Family, Scratch, TextComponent, attention_mask_of
from pipeline.diffusion.flow_matching import RESOLUTION_SHIFT, FlowMatching, flow_objective, flow_of
from pipeline.diffusion.tokenizer import build_t5_tokenizer

DECLARED = {"name": "chroma", "presets": ("tiny", "chroma1"), "objective": "flow", "latent_channels": 16,
            "patch": 2, "latents_shifted": True}

PATCH = DECLARED["patch"]  # latent pixels per packed token side


@dataclass(frozen=True)
class Preset:
    double_layers: int
    single_layers: int
    heads: int
    rope_axes: tuple[int, int, int]  # rotary dimensions of (unused, row, column); they sum to the head width
    approximator_channels: int  # the σ embedding's width (4 sinusoid groups)
    approximator_width: int
    approximator_layers: int
    t5_width: int
    t5_layers: int
    t5_heads: int
    t5_feed_forward: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 2, 4, (8, 12, 12), 16, 32, 1, 64, 2, 4, 128),
    "chroma1": Preset(19, 38, 24, (16, 56, 56), 64, 5120, 5, 4096, 24, 64, 10240),
}


def build_transformer(preset: Preset, *, latent_channels: int, latent_size: int) -> ChromaTransformer2DModel:
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * PATCH * PATCH,
        num_layers=preset.double_layers,
        num_single_layers=preset.single_layers,
        attention_head_dim=sum(preset.rope_axes),
        num_attention_heads=preset.heads,
        joint_attention_dim=preset.t5_width,
        axes_dims_rope=preset.rope_axes,
        approximator_num_channels=preset.approximator_channels,
        approximator_hidden_dim=preset.approximator_width,
        approximator_layers=preset.approximator_layers,
    )
    # ChromaPipeline samples 1024 px unless told: the size sdpipe samples at (as flux.register_sample_size)
    transformer.register_to_config(sample_size=latent_size)
    return transformer


def transformer_text_mask(tokenizer_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The caption's tokens and the first padding token (ChromaPipeline._get_t5_prompt_embeds)."""
    positions = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device)
    return (positions[None, :] <= tokenizer_mask.sum(dim=1, keepdim=True)).to(dtype)


class Chroma(Family):
    declared = Declared(**DECLARED)
    pipeline_class = ChromaPipeline
    denoiser, denoiser_class = "transformer", ChromaTransformer2DModel
    text = (TextComponent("tokenizer", "text_encoder", T5EncoderModel, AutoTokenizer, sequence_length_is_a_param=True,
                          masked=True),)
    conditioning = ("prompt_embeds", "prompt_attention_mask")
    # Flux's (diffusers' train_dreambooth_lora_flux.py): Chroma's blocks keep Flux's layer names
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")
    lora_layers_argument = "transformer_lora_layers"
    argument_reasons = {
        **Family.argument_reasons,
        "height": "the size it was trained at: ChromaPipeline samples 1024 px unless told (it does not read the "
                  "transformer's recorded `sample_size`)",
    }

    def scratch_components(self, scratch: Scratch) -> dict[str, object]:
        preset = PRESETS[scratch.preset]
        tokenizer = build_t5_tokenizer(scratch.captions, vocab_size=scratch.vocab_size,
                                       max_tokens=scratch.max_sequence_length)
        t5 = T5EncoderModel(t5_encoder_config(tokenizer, preset.t5_width, preset.t5_layers, preset.t5_heads,
                                              preset.t5_feed_forward, dropout=0.0))
        transformer = build_transformer(preset, latent_channels=scratch.latent_channels,
                                        latent_size=scratch.latent_size)
        return {"tokenizer": tokenizer, "text_encoder": t5, "transformer": transformer}

    def training_objective(self, train: TrainParams, pretrained_scheduler: dict | None) -> FlowMatching:
        return flow_objective(train.flow, RESOLUTION_SHIFT, patch_size=PATCH, pretrained_scheduler=pretrained_scheduler)

    def objective_of(self, scheduler_config: dict) -> FlowMatching:
        return flow_of(scheduler_config, patch_size=PATCH)

    def denoiser_latent_channels(self, denoiser) -> int:
        return denoiser.config.in_channels // (PATCH * PATCH)

    def encode_text(self, components: dict, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokenizer_mask = token_ids[attention_mask_of("tokenizer")]
        states = components["text_encoder"](token_ids["tokenizer"], attention_mask=tokenizer_mask,
                                            output_hidden_states=False)[0]
        return {"prompt_embeds": states, "prompt_attention_mask": transformer_text_mask(tokenizer_mask, states.dtype)}

    def predict(self, denoiser, noisy, timesteps, conditioning, image_sizes) -> torch.Tensor:
        count, channels, height, width = noisy.shape
        states, text_mask = conditioning["prompt_embeds"], conditioning["prompt_attention_mask"]
        packed = ChromaPipeline._pack_latents(noisy, count, channels, height, width)
        image_ids = ChromaPipeline._prepare_latent_image_ids(count, height // PATCH, width // PATCH, noisy.device,
                                                             noisy.dtype)
        text_ids = torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        # the image tokens attend everywhere (ChromaPipeline._prepare_attention_mask)
        mask = torch.cat([text_mask, torch.ones(count, packed.shape[1], device=noisy.device, dtype=torch.bool)], dim=1)
        prediction = denoiser(hidden_states=packed, timestep=timesteps / 1000, encoder_hidden_states=states,
                              txt_ids=text_ids, img_ids=image_ids, attention_mask=mask).sample
        return ChromaPipeline._unpack_latents(prediction, height, width, 1)

    def sampling_arguments(self, pipeline, prompts, guidance_scale, negative_prompt=None) -> dict:
        return {**super().sampling_arguments(pipeline, prompts, guidance_scale, negative_prompt),
                "max_sequence_length": pipeline.tokenizer.model_max_length}


FAMILY = Chroma()
