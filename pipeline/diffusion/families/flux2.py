"""Flux.2 klein (4B and 9B, base): a transformer (`Flux2Transformer2DModel` without the guidance embedding:
double-stream, then single-stream blocks) over the latents of Flux.2's VAE (`AutoencoderKLFlux2`) folded into
2x2 patches and standardised by the VAE's BatchNorm statistics (pipeline/diffusion/latent_space.py:
`PatchNormalisedLatents`), one token per patch, with 4-axis rotary positions (time, row, column, text
position). It attends to Qwen3's hidden states of three layers stacked along the width: the layers
Flux2KleinPipeline reads (`text_encoder_out_layers`, (9, 18, 27)), taken from its signature here. diffusers'
klein training script defaults to (10, 20, 30) instead, a mismatch its users lost days of GPU time to
(huggingface/diffusers #13445). Trained by flow matching (pipeline/diffusion/flow_matching.py) with Flux.1's
resolution-dependent shift (BFL trained Flux.2 with dynamic shifting, OneTrainer PR #1516; musubi-tuner's
`flux2_shift` is the same curve); the transformer takes σ (the timestep / 1000), as the pipeline passes it.

- Prompts: Qwen's chat template (one user turn, the generation prompt with thinking off) padded to
  `model.max_sequence_length` tokens; Qwen3 reads the attention mask, the transformer sees every position
  (the pipeline passes it no mask). The states are (N, L, 3 x Qwen3's width): an 8 MiB cache entry per caption
  for the 4B at 512 tokens, so a shorter `model.max_sequence_length` pays off.
- Guidance: the base models take true classifier-free guidance against the empty prompt (`is_distilled=False`),
  which caption dropout trains; the pipeline takes no negative prompt, so sampling refuses one.

Scratch sizes (`model.preset`): `tiny` trains on a CPU (diffusers' test config, widened to Flux's tiny preset;
its Qwen3 has just the 28 layers the pipeline's layer 27 needs); `klein_4b` and `klein_9b` have the released
transformers' sizes and Qwen3-4B's and Qwen3-8B's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from pipeline.core.config import TrainParams
from pipeline.core.family_declarations import Declared
from pipeline.diffusion.families.base import Family, Scratch, TextComponent, attention_mask_of
from pipeline.diffusion.flow_matching import RESOLUTION_SHIFT, FlowMatching, flow_objective, flow_of
from pipeline.diffusion.latent_space import PatchNormalisedLatents
from pipeline.diffusion.tokenizer import build_qwen2_tokenizer, tokenized

DECLARED = {"name": "flux2", "presets": ("tiny", "klein_4b", "klein_9b"), "objective": "flow",
            "latent_channels": 32, "patch": 2, "latents_shifted": False}

PATCH = DECLARED["patch"]  # VAE latent pixels per token side
LATENT_SPACE = PatchNormalisedLatents()
# the denoiser's input pixels per token side: the latent space has folded the 2x2 patches into channels already
TOKEN_PATCH = PATCH // LATENT_SPACE.patch
# the Qwen3 hidden states the pipeline stacks: its call's default, never a training script's
TEXT_LAYERS: tuple[int, ...] = tuple(
    inspect.signature(Flux2KleinPipeline.__call__).parameters["text_encoder_out_layers"].default)


@dataclass(frozen=True)
class Preset:
    double_layers: int
    single_layers: int
    heads: int
    rope_axes: tuple[int, int, int, int]  # rotary dimensions of (time, row, column, text); they sum to the head width
    qwen_width: int
    qwen_layers: int
    qwen_heads: int
    qwen_kv_heads: int
    qwen_head_width: int
    qwen_feed_forward: int
    qwen_tied_embeddings: bool


PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 2, 4, (8, 8, 8, 8), 32, max(TEXT_LAYERS) + 1, 2, 2, 16, 64, True),
    "klein_4b": Preset(5, 20, 24, (32, 32, 32, 32), 2560, 36, 32, 8, 128, 9728, True),
    "klein_9b": Preset(8, 24, 32, (32, 32, 32, 32), 4096, 36, 32, 8, 128, 12288, False),
}


SINGLE_BLOCKS = max(preset.single_layers for preset in PRESETS.values())


def build_transformer(preset: Preset, *, latent_channels: int, latent_size: int) -> Flux2Transformer2DModel:
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=latent_channels * PATCH * PATCH,
        num_layers=preset.double_layers,
        num_single_layers=preset.single_layers,
        attention_head_dim=sum(preset.rope_axes),
        num_attention_heads=preset.heads,
        joint_attention_dim=len(TEXT_LAYERS) * preset.qwen_width,
        axes_dims_rope=preset.rope_axes,
        guidance_embeds=False,
    )
    # Flux2KleinPipeline samples 1024 px unless told: the size sdpipe samples at (as flux.register_sample_size)
    transformer.register_to_config(sample_size=latent_size)
    return transformer


def build_text_encoder(preset: Preset, tokenizer) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=preset.qwen_width,
        intermediate_size=preset.qwen_feed_forward,
        num_hidden_layers=preset.qwen_layers,
        num_attention_heads=preset.qwen_heads,
        num_key_value_heads=preset.qwen_kv_heads,
        head_dim=preset.qwen_head_width,
        max_position_embeddings=max(512, tokenizer.model_max_length),
        tie_word_embeddings=preset.qwen_tied_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    ))


def chat_prompts(tokenizer, captions: list[str]) -> list[str]:
    """Each caption as the pipeline hands it to the tokenizer (Flux2KleinPipeline._get_qwen3_prompt_embeds)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False) for caption in captions]


class Flux2(Family):
    declared = Declared(**DECLARED)
    latent_space = LATENT_SPACE
    pipeline_class = Flux2KleinPipeline
    denoiser, denoiser_class = "transformer", Flux2Transformer2DModel
    text = (TextComponent("tokenizer", "text_encoder", Qwen3ForCausalLM, AutoTokenizer,
                          sequence_length_is_a_param=True, masked=True),)
    conditioning = ("prompt_embeds",)
    # diffusers' train_dreambooth_lora_flux2_klein.py: attention, the single blocks' fused projections and their
    # outputs, named one by one (a double block's `attn.to_out` is a module list, which LoRA cannot wrap)
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                    *(f"single_transformer_blocks.{block}.attn.to_out" for block in range(SINGLE_BLOCKS)))
    lora_layers_argument = "transformer_lora_layers"
    pipeline_options = {"is_distilled": False}
    argument_reasons = {
        **Family.argument_reasons,
        "guidance_scale": "true classifier-free guidance against the empty prompt (the base model is not "
                          "guidance-distilled), the guidance sdpipe samples with (`evaluate.guidance_scale`'s default)",
        "height": "the size it was trained at: Flux2KleinPipeline samples 1024 px unless told (it does not read the "
                  "transformer's recorded `sample_size`)",
        "max_sequence_length": "Qwen3's tokens per prompt in training (`model.max_sequence_length`): the transformer "
                               "attends to every padded position, so another length gives the prompt other states",
    }

    def scratch_components(self, scratch: Scratch) -> dict[str, object]:
        preset = PRESETS[scratch.preset]
        tokenizer = build_qwen2_tokenizer(scratch.captions, vocab_size=scratch.vocab_size,
                                          max_tokens=scratch.max_sequence_length)
        transformer = build_transformer(preset, latent_channels=scratch.latent_channels,
                                        latent_size=scratch.latent_size)
        return {"tokenizer": tokenizer, "text_encoder": build_text_encoder(preset, tokenizer),
                "transformer": transformer}

    def training_objective(self, train: TrainParams, pretrained_scheduler: dict | None) -> FlowMatching:
        return flow_objective(train.flow, RESOLUTION_SHIFT, patch_size=TOKEN_PATCH,
                              pretrained_scheduler=pretrained_scheduler)

    def objective_of(self, scheduler_config: dict) -> FlowMatching:
        return flow_of(scheduler_config, patch_size=TOKEN_PATCH)

    def denoiser_latent_channels(self, denoiser) -> int:
        return denoiser.config.in_channels // (PATCH * PATCH)

    def token_ids(self, tokenizers: dict, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = tokenizers["tokenizer"]
        encoded = tokenized(tokenizer, chat_prompts(tokenizer, captions))
        return {"tokenizer": encoded.input_ids, attention_mask_of("tokenizer"): encoded.attention_mask}

    def encode_text(self, components: dict, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        output = components["text_encoder"](input_ids=token_ids["tokenizer"],
                                            attention_mask=token_ids[attention_mask_of("tokenizer")],
                                            output_hidden_states=True, use_cache=False)
        stacked = torch.stack([output.hidden_states[layer] for layer in TEXT_LAYERS], dim=2)  # (N, L, layers, width)
        return {"prompt_embeds": stacked.flatten(2)}

    def predict(self, denoiser, noisy, timesteps, conditioning, image_sizes) -> torch.Tensor:
        count, channels, height, width = noisy.shape
        states = conditioning["prompt_embeds"]
        image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(noisy.device)
        text_ids = Flux2KleinPipeline._prepare_text_ids(states).to(noisy.device)
        prediction = denoiser(hidden_states=Flux2KleinPipeline._pack_latents(noisy), timestep=timesteps / 1000,
                              guidance=None, encoder_hidden_states=states, txt_ids=text_ids,
                              img_ids=image_ids).sample
        return prediction.transpose(1, 2).reshape(count, channels, height, width)

    def sampling_arguments(self, pipeline, prompts, guidance_scale, negative_prompt=None) -> dict:
        if negative_prompt:
            raise ValueError(f"negative prompt {negative_prompt!r}: Flux2KleinPipeline guides against the empty prompt "
                             "and takes no negative prompt; leave it out")
        return {"prompt": prompts, "guidance_scale": guidance_scale,
                "max_sequence_length": pipeline.tokenizer.model_max_length, **self.trained_size(pipeline)}


FAMILY = Flux2()
