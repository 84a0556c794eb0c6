"""Flux.1 (dev and schnell): a transformer (`FluxTransformer2DModel`: double-stream, then single-stream
blocks) over latents packed into 2x2 patches, with rotary positions from each patch's row and column
(`img_ids`; the text tokens' ids, `txt_ids`, are zeros). It attends to T5's states; CLIP's pooled output
conditions every block. Trained by flow matching (pipeline/diffusion/flow_matching.py); the transformer takes
σ (the timestep / 1000), as FluxPipeline passes it (`FluxPipeline`).

- Guidance: dev is guidance-distilled: the guidance scale is an input embedding, not classifier-free
  guidance. Models with the embedding (`tiny`, `flux_dev`) are trained at guidance 1.0, as kohya's and
  SimpleTuner's Flux guides advise (diffusers' script defaults to 3.5), and sampled at 1.0. Caption dropout
  trains the unconditional branch, so sampling uses true classifier-free guidance (`true_cfg_scale`, against
  the empty prompt) at the guidance scale asked for.
- Shift: resolution-dependent by default (`train.flow.shift: null`): σ is shifted by e^μ with μ from the
  latent's token count, the curve FluxPipeline samples with (dynamic shifting). BFL trained Flux so (OneTrainer
  PR #1516), and training at the noise levels the sampler visits is what matters here. diffusers' own Flux
  script trains on unshifted σ, because its scheduler config enables dynamic shifting, which leaves the
  training table unshifted: the pitfall issue 20 names.
- T5 reads `model.max_sequence_length` tokens, saved as its tokenizer's length and passed to every sampler call.

Scratch sizes (`model.preset`): `tiny` trains on a CPU; `flux_dev` and `flux_schnell` have Flux.1's
transformer (with and without the guidance embedding) and text-encoder sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from pipeline.core.config import TrainParams
from pipeline.core.family_declarations import Declared
from pipeline.diffusion.components import clip_text_config, t5_encoder_config
from pipeline.diffusion.families.base import Family, Scratch, TextComponent
from pipeline.diffusion.flow_matching import RESOLUTION_SHIFT, FlowMatching, flow_objective, flow_of
from pipeline.diffusion.tokenizer import build_t5_tokenizer, build_tokenizer

DECLARED = {"name": "flux", "presets": ("tiny", "flux_dev", "flux_schnell"), "objective": "flow",
            "latent_channels": 16, "patch": 2, "latents_shifted": True}

PATCH = DECLARED["patch"]  # latent pixels per packed token side
TRAINED_GUIDANCE = 1.0  # the guidance embedding's input in training and sampling


@dataclass(frozen=True)
class Preset:
    double_layers: int
    single_layers: int
    heads: int
    rope_axes: tuple[int, int, int]  # rotary dimensions of (unused, row, column); they sum to the head width
    guidance_embedding: bool  # dev-like (distilled guidance) or schnell-like
    clip_width: int
    clip_layers: int
    clip_heads: int
    max_tokens: int  # the CLIP tokenizer's fixed length
    t5_width: int
    t5_layers: int
    t5_heads: int
    t5_feed_forward: int


CLIP_L, T5_XXL = (768, 12, 12, 77), (4096, 24, 64, 10240)
PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 2, 4, (8, 12, 12), True, 32, 2, 4, 24, 64, 2, 4, 128),
    "flux_dev": Preset(19, 38, 24, (16, 56, 56), True, *CLIP_L, *T5_XXL),
    "flux_schnell": Preset(19, 38, 24, (16, 56, 56), False, *CLIP_L, *T5_XXL),
}


def build_transformer(preset: Preset, *, latent_channels: int, latent_size: int) -> FluxTransformer2DModel:
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * PATCH * PATCH,
        num_layers=preset.double_layers,
        num_single_layers=preset.single_layers,
        attention_head_dim=sum(preset.rope_axes),
        num_attention_heads=preset.heads,
        joint_attention_dim=preset.t5_width,
        pooled_projection_dim=preset.clip_width,
        guidance_embeds=preset.guidance_embedding,
        axes_dims_rope=preset.rope_axes,
    )
    register_sample_size(transformer, latent_size)
    return transformer


def register_sample_size(transformer: FluxTransformer2DModel, latent_size: int) -> None:
    """FluxPipeline samples 1024 px unless told: the latent side recorded in the transformer's config (an entry
    diffusers keeps, with a warning that its class does not use it) is the size sdpipe samples at."""
    transformer.register_to_config(sample_size=latent_size)


def guidance_embedded(denoiser) -> bool:
    """Whether the transformer (or the one a distributed wrapper holds) takes the guidance embedding."""
    return getattr(denoiser, "module", denoiser).config.guidance_embeds


class Flux(Family):
    declared = Declared(**DECLARED)
    pipeline_class = FluxPipeline
    denoiser, denoiser_class = "transformer", FluxTransformer2DModel
    text = (TextComponent("tokenizer", "text_encoder", CLIPTextModel, AutoTokenizer),
            TextComponent("tokenizer_2", "text_encoder_2", T5EncoderModel, AutoTokenizer,
                          sequence_length_is_a_param=True))
    conditioning = ("prompt_embeds", "pooled_prompt_embeds")
    # diffusers' train_dreambooth_lora_flux.py
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")
    lora_layers_argument = "transformer_lora_layers"
    argument_reasons = {
        **Family.argument_reasons,
        "guidance_scale": f"the input of the guidance embedding, trained at {TRAINED_GUIDANCE}",
        "true_cfg_scale": "true classifier-free guidance, the guidance sdpipe samples with "
                          "(`evaluate.guidance_scale`'s default)",
        "negative_prompt": "true guidance's unconditional branch, the empty prompt caption dropout trained (without "
                           "a negative prompt FluxPipeline skips true guidance)",
        "height": "the size it was trained at: FluxPipeline samples 1024 px unless told (it does not read the "
                  "transformer's recorded `sample_size`)",
    }

    def scratch_components(self, scratch: Scratch) -> dict[str, object]:
        preset = PRESETS[scratch.preset]
        clip_tokenizer = build_tokenizer(scratch.captions, vocab_size=scratch.vocab_size, max_tokens=preset.max_tokens)
        t5_tokenizer = build_t5_tokenizer(scratch.captions, vocab_size=scratch.vocab_size,
                                          max_tokens=scratch.max_sequence_length)
        clip = CLIPTextModel(clip_text_config(clip_tokenizer, preset.clip_width, preset.clip_layers, preset.clip_heads))
        t5 = T5EncoderModel(t5_encoder_config(t5_tokenizer, preset.t5_width, preset.t5_layers, preset.t5_heads,
                                              preset.t5_feed_forward, dropout=0.0))
        transformer = build_transformer(preset, latent_channels=scratch.latent_channels,
                                        latent_size=scratch.latent_size)
        return {"tokenizer": clip_tokenizer, "tokenizer_2": t5_tokenizer, "text_encoder": clip, "text_encoder_2": t5,
                "transformer": transformer}

    def training_objective(self, train: TrainParams, pretrained_scheduler: dict | None) -> FlowMatching:
        return flow_objective(train.flow, RESOLUTION_SHIFT, patch_size=PATCH, pretrained_scheduler=pretrained_scheduler)

    def objective_of(self, scheduler_config: dict) -> FlowMatching:
        return flow_of(scheduler_config, patch_size=PATCH)

    def denoiser_latent_channels(self, denoiser) -> int:
        return denoiser.config.in_channels // (PATCH * PATCH)

    def encode_text(self, components: dict, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pooled = components["text_encoder"](token_ids["tokenizer"], output_hidden_states=False).pooler_output
        states = components["text_encoder_2"](token_ids["tokenizer_2"], output_hidden_states=False)[0]
        return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}

    def predict(self, denoiser, noisy, timesteps, conditioning, image_sizes) -> torch.Tensor:
        count, channels, height, width = noisy.shape
        states = conditioning["prompt_embeds"]
        packed = FluxPipeline._pack_latents(noisy, count, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(count, height // PATCH, width // PATCH, noisy.device,
                                                           noisy.dtype)
        text_ids = torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = torch.full((count,), TRAINED_GUIDANCE, device=noisy.device, dtype=torch.float32) \
            if guidance_embedded(denoiser) else None
        prediction = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                              pooled_projections=conditioning["pooled_prompt_embeds"], encoder_hidden_states=states,
                              txt_ids=text_ids, img_ids=image_ids).sample
        return FluxPipeline._unpack_latents(prediction, height, width, 1)

    def sampling_arguments(self, pipeline, prompts, guidance_scale, negative_prompt=None) -> dict:
        return {"prompt": prompts, "true_cfg_scale": guidance_scale,
                "negative_prompt": [negative_prompt or ""] * len(prompts), "guidance_scale": TRAINED_GUIDANCE,
                "max_sequence_length": pipeline.tokenizer_2.model_max_length, **self.trained_size(pipeline)}


FAMILY = Flux()
