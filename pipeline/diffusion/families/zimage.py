"""Z-Image (Tongyi-MAI's Z-Image and Z-Image-Turbo, 6 B): one single-stream transformer
(`ZImageTransformer2DModel`: refiner blocks for the image and for the text, then joint blocks over both) on
Flux's 16-channel VAE latents, patched 2x2 inside the transformer. It reads the states of a Qwen3 language model
(`Qwen3Model`) at its second-to-last layer, over the prompt in Qwen's chat template. Trained by flow matching
(pipeline/diffusion/flow_matching.py) with a static shift, as ZImagePipeline samples.

- Time and sign: the transformer takes 1 - σ (the pipeline's `(1000 - t) / 1000`) and predicts x0 - ε, which
  the pipeline negates into the velocity its Euler step takes: `predict` does both, so sdpipe's objective and
  sampler see the velocity as for every flow family.
- Text: each prompt goes through the tokenizer's chat template (`enable_thinking=True`, as the pipeline calls
  it), is padded to `model.max_sequence_length` tokens, and the transformer takes each caption's states without
  its padding (`embeds[i][mask[i]]`, a list of different lengths). Encode caches the padded states, zero where
  padded, beside the attention mask (`prompt_attention_mask`); `predict` cuts each caption's own rows.
- Guidance: ZImagePipeline's `guidance_scale` g mixes `pos + g·(pos - neg)`, so sdpipe's classifier-free scale w
  (`neg + w·(pos - neg)`, every other family's) is passed as g = w - 1; w = 1 is g = 0, no guidance, as the
  pipeline turns it off at g = 0. The unconditional branch is the empty prompt, which caption dropout trains.
- Shift: Tongyi-MAI/Z-Image's scheduler config (static 6.0; Turbo's is 3.0) for a scratch model; a fine-tune
  takes the pretrained scheduler's own (pipeline/diffusion/flow_matching.py `flow_objective`).
- LoRA: train on the base (Tongyi-MAI/Z-Image), not on Turbo: Turbo is step-distilled, and a LoRA trained on it
  undoes the distillation (docs/guides/model-families.md).

Scratch sizes (`model.preset`): `tiny` trains on a CPU (diffusers' test config, widened as Chroma's tiny, with
4 joint layers: at 2 more of its squares read as circles, adherence 0.708 against 0.819 on the shapes at the
default steps);
`z_image_6b` has Z-Image's transformer (30 layers of width 3840, 2 refiner layers each) and Qwen3-4B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

from pipeline.core.config import TrainParams
from pipeline.core.family_declarations import Declared
from pipeline.diffusion.families.base import Family, Scratch, TextComponent, attention_mask_of
from pipeline.diffusion.flow_matching import FlowMatching, flow_objective, flow_of
from pipeline.diffusion.tokenizer import QWEN_IM_END, build_qwen2_tokenizer, tokenized

DECLARED = {"name": "zimage", "presets": ("tiny", "z_image_6b"), "objective": "flow", "latent_channels": 16,
            "patch": 2, "latents_shifted": True}

PATCH = DECLARED["patch"]  # latent pixels per token side (the transformer patches inside)
SHIFT = 6.0  # Tongyi-MAI/Z-Image's scheduler_config.json: static (use_dynamic_shifting false)
STATES_LAYER = -2  # ZImagePipeline._encode_prompt: hidden_states[-2] of the Qwen3 encoder
UNSIZED_SIDE = 1024  # ZImagePipeline.__call__ samples height = width = 1024 px when the call names none
MASK = "prompt_attention_mask"  # the cached tokenizer mask, in the states' dtype


@dataclass(frozen=True)
class Preset:
    width: int
    layers: int
    refiner_layers: int
    heads: int
    rope_axes: tuple[int, int, int]  # rotary dimensions of (caption position, row, column); they sum to head width
    rope_lengths: tuple[int, int, int]  # positions each axis covers
    qwen_width: int
    qwen_feed_forward: int
    qwen_layers: int
    qwen_heads: int
    qwen_kv_heads: int
    qwen_head_width: int


QWEN3_4B = (2560, 9728, 36, 32, 8, 128)
PRESETS: dict[str, Preset] = {
    "tiny": Preset(128, 4, 1, 4, (8, 12, 12), (1024, 64, 64), 64, 128, 2, 4, 2, 16),
    "z_image_6b": Preset(3840, 30, 2, 30, (32, 48, 48), (1024, 512, 512), *QWEN3_4B),
}


def build_transformer(preset: Preset, *, latent_channels: int, latent_size: int) -> ZImageTransformer2DModel:
    transformer = ZImageTransformer2DModel(
        all_patch_size=(PATCH,),
        all_f_patch_size=(1,),
        in_channels=latent_channels,
        dim=preset.width,
        n_layers=preset.layers,
        n_refiner_layers=preset.refiner_layers,
        n_heads=preset.heads,
        n_kv_heads=preset.heads,
        qk_norm=True,
        cap_feat_dim=preset.qwen_width,
        axes_dims=list(preset.rope_axes),
        axes_lens=list(preset.rope_lengths),
    )
    # the size sdpipe samples at (ZImagePipeline samples 1024 px unless told), as flux.register_sample_size
    transformer.register_to_config(sample_size=latent_size)
    return transformer


def build_text_encoder(preset: Preset, tokenizer) -> Qwen3Model:
    return Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=preset.qwen_width,
        intermediate_size=preset.qwen_feed_forward,
        num_hidden_layers=preset.qwen_layers,
        num_attention_heads=preset.qwen_heads,
        num_key_value_heads=preset.qwen_kv_heads,
        head_dim=preset.qwen_head_width,
        max_position_embeddings=max(512, tokenizer.model_max_length),
        rope_theta=1_000_000.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(QWEN_IM_END),
        bos_token_id=None,
    ))


def chat_prompts(tokenizer, captions: list[str]) -> list[str]:
    """Captions as ZImagePipeline._encode_prompt hands them to the tokenizer."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=True) for caption in captions]


def caption_states(states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each caption's states without its padding rows: the list the transformer takes."""
    kept = mask.bool()
    return [states[row][kept[row]] for row in range(len(states))]


class ZImage(Family):
    declared = Declared(**DECLARED)
    pipeline_class = ZImagePipeline
    denoiser, denoiser_class = "transformer", ZImageTransformer2DModel
    text = (TextComponent("tokenizer", "text_encoder", Qwen3Model, AutoTokenizer, sequence_length_is_a_param=True,
                          masked=True),)
    conditioning = ("prompt_embeds", MASK)
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' train_dreambooth_lora_z_image.py
    lora_layers_argument = "transformer_lora_layers"
    argument_reasons = {
        **Family.argument_reasons,
        "guidance_scale": "ZImagePipeline's guidance g mixes pos + g·(pos - neg): sdpipe's classifier-free scale "
                          "(`evaluate.guidance_scale`'s default) minus 1",
        "max_sequence_length": "Qwen3's tokens per templated prompt in training (`model.max_sequence_length`)",
        "height": "the size it was trained at: ZImagePipeline samples 1024 px unless told (it does not read the "
                  "transformer's recorded `sample_size`)",
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
        return flow_objective(train.flow, SHIFT, patch_size=PATCH, pretrained_scheduler=pretrained_scheduler)

    def objective_of(self, scheduler_config: dict) -> FlowMatching:
        return flow_of(scheduler_config, patch_size=PATCH)

    def token_ids(self, tokenizers: dict, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = tokenizers["tokenizer"]
        encoded = tokenized(tokenizer, chat_prompts(tokenizer, captions))
        return {"tokenizer": encoded.input_ids, attention_mask_of("tokenizer"): encoded.attention_mask}

    def encode_text(self, components: dict, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = token_ids[attention_mask_of("tokenizer")].bool()
        states = components["text_encoder"](input_ids=token_ids["tokenizer"], attention_mask=mask,
                                            output_hidden_states=True).hidden_states[STATES_LAYER]
        # zero where padded: the cache then holds only what the transformer reads
        return {"prompt_embeds": states * mask[..., None].to(states.dtype), MASK: mask.to(states.dtype)}

    def predict(self, denoiser, noisy, timesteps, conditioning, image_sizes) -> torch.Tensor:
        captions = caption_states(conditioning["prompt_embeds"], conditioning[MASK])
        frames = list(noisy.unsqueeze(2).unbind(dim=0))  # (C, 1, H, W) each: one frame
        predicted = denoiser(frames, (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack(predicted).squeeze(2)

    def sampling_arguments(self, pipeline, prompts, guidance_scale, negative_prompt=None) -> dict:
        negative = {"negative_prompt": [negative_prompt] * len(prompts)} if negative_prompt else {}
        # a copy: ZImagePipeline writes the templated prompts into the list it is given
        return {"prompt": list(prompts), "guidance_scale": guidance_scale - 1, **negative,
                "max_sequence_length": pipeline.tokenizer.model_max_length, **self.trained_size(pipeline)}

    def default_size(self, pipeline) -> dict[str, int]:
        return {"height": UNSIZED_SIDE, "width": UNSIZED_SIDE}

    def with_cached_states(self, arguments: dict) -> dict:
        """The pipeline takes each caption's states as an unpadded list, and no mask."""
        converted = dict(arguments)
        for prefix in ("", "negative_"):
            mask = converted.pop(f"{prefix}{MASK}")
            converted[f"{prefix}prompt_embeds"] = caption_states(converted[f"{prefix}prompt_embeds"], mask)
        return converted


FAMILY = ZImage()
