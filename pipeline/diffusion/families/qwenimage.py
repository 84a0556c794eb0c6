"""Qwen-Image (20 B, Apache-2.0): a double-stream transformer (`QwenImageTransformer2DModel`, MMDiT) over
the 16-channel latents of Qwen-Image's video-style VAE (`AutoencoderKLQwenImage`, an image as one frame,
pipeline/diffusion/latent_space.py: `FrameLatents`, standardised per channel by its config's `latents_mean` and
`latents_std`), packed into 2x2 patches, one token each. It attends to the last hidden states of Qwen2.5-VL
(`Qwen2_5_VLForConditionalGeneration`, its vision tower unused) with their padding masked. Trained by flow
matching (pipeline/diffusion/flow_matching.py); the transformer takes σ (the timestep / 1000), as the pipeline
passes it.

- Prompts: QwenImagePipeline formats each into its fixed system-prompt template and drops the template's first
  34 tokens (`prompt_template_encode_start_idx`, a count in Qwen's own vocabulary) from the states; both are read
  from the pipeline here, and a scratch tokenizer learns the template's words whole so that the 34 tokens are the
  same system prompt. Captions are tokenized to `model.max_sequence_length` + 34 tokens, so the states are
  `model.max_sequence_length` rows, zero where padded, with the transformer's mask (`prompt_embeds_mask`) beside
  them in the cache: the pipeline's argument of that name.
- Guidance: true classifier-free guidance (`true_cfg_scale`, with the combined prediction rescaled to the
  conditional one's norm, as the pipeline does) against a negative prompt, the empty prompt unless one is given
  (caption dropout trains it); the transformer has no guidance embedding, so `guidance_scale` is not passed.
- Shift: dynamic (exponential time shift, μ from the token count between 0.5 at 256 and 0.9 at 8192 tokens,
  σ stretched to end at 0.02): Qwen/Qwen-Image's scheduler config for a scratch model, a fine-tune's own
  pretrained scheduler otherwise.

Scratch sizes (`model.preset`): `tiny` trains on a CPU (diffusers' test config, widened as Chroma's tiny);
`qwen_image_20b` has Qwen-Image's transformer (60 layers of 24 heads of 128) and Qwen2.5-VL-7B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from pipeline.core.config import TrainParams
from pipeline.core.family_declarations import Declared
from pipeline.diffusion.families.base import Family, Scratch, TextComponent, attention_mask_of
from pipeline.diffusion.flow_matching import RESOLUTION_SHIFT, FlowMatching, flow_objective, flow_of
from pipeline.diffusion.latent_space import FrameLatents
from pipeline.diffusion.tokenizer import QWEN_IM_END, build_qwen2_tokenizer

DECLARED = {"name": "qwenimage", "presets": ("tiny", "qwen_image_20b"), "objective": "flow", "latent_channels": 16,
            "patch": 2, "latents_shifted": False}

PATCH = DECLARED["patch"]  # latent pixels per packed token side
MASK = "prompt_embeds_mask"  # the transformer's text mask, in the states' dtype
# Qwen/Qwen-Image's scheduler_config.json: a scratch model samples and trains at the released model's shifts
SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
             "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential", "use_dynamic_shifting": True}


def pipeline_prompt_template() -> tuple[str, int]:
    """The template QwenImagePipeline formats prompts into and the count of its leading tokens it drops (set in
    its constructor, so read from a pipeline without components)."""
    unbuilt = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return unbuilt.prompt_template_encode, unbuilt.prompt_template_encode_start_idx


PROMPT_TEMPLATE, TEMPLATE_TOKENS = pipeline_prompt_template()


@dataclass(frozen=True)
class Preset:
    layers: int
    heads: int
    rope_axes: tuple[int, int, int]  # rotary dimensions of (frame, row, column); they sum to the head width
    qwen_width: int
    qwen_feed_forward: int
    qwen_layers: int
    qwen_heads: int
    qwen_kv_heads: int
    qwen_rope_sections: tuple[int, int, int]  # Qwen2.5-VL's multimodal rotary sections: half its head width
    vision_depth: int
    vision_width: int
    vision_feed_forward: int
    vision_heads: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 4, (8, 12, 12), 64, 128, 2, 4, 2, (2, 3, 3), 2, 16, 16, 2),
    "qwen_image_20b": Preset(60, 24, (16, 56, 56), 3584, 18944, 28, 28, 4, (16, 24, 24), 32, 1280, 3420, 16),
}


def build_transformer(preset: Preset, *, latent_channels: int, latent_size: int) -> QwenImageTransformer2DModel:
    transformer = QwenImageTransformer2DModel(
        patch_size=PATCH,
        in_channels=latent_channels * PATCH * PATCH,
        out_channels=latent_channels,
        num_layers=preset.layers,
        attention_head_dim=sum(preset.rope_axes),
        num_attention_heads=preset.heads,
        joint_attention_dim=preset.qwen_width,
        guidance_embeds=False,
        axes_dims_rope=preset.rope_axes,
    )
    # QwenImagePipeline samples 1024 px unless told: the size sdpipe samples at (as flux.register_sample_size)
    transformer.register_to_config(sample_size=latent_size)
    return transformer


def build_text_encoder(preset: Preset, tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ends = tokenizer.convert_tokens_to_ids(QWEN_IM_END)
    text = dict(vocab_size=len(tokenizer), hidden_size=preset.qwen_width, intermediate_size=preset.qwen_feed_forward,
                num_hidden_layers=preset.qwen_layers, num_attention_heads=preset.qwen_heads,
                num_key_value_heads=preset.qwen_kv_heads, rope_theta=1_000_000.0,
                rope_scaling={"mrope_section": list(preset.qwen_rope_sections), "rope_type": "default",
                              "type": "default"},
                max_position_embeddings=max(512, tokenizer.model_max_length + TEMPLATE_TOKENS),
                pad_token_id=tokenizer.pad_token_id, eos_token_id=ends, bos_token_id=None)
    vision = dict(depth=preset.vision_depth, hidden_size=preset.vision_width,
                  intermediate_size=preset.vision_feed_forward, num_heads=preset.vision_heads,
                  out_hidden_size=preset.qwen_width)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vocab_size=len(tokenizer), hidden_size=preset.qwen_width,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=ends, bos_token_id=None))


def templated(captions: list[str]) -> list[str]:
    """Each caption as QwenImagePipeline._get_qwen_prompt_embeds hands it to the tokenizer."""
    return [PROMPT_TEMPLATE.format(caption) for caption in captions]


class QwenImage(Family):
    declared = Declared(**DECLARED)
    latent_space = FrameLatents()
    pipeline_class = QwenImagePipeline
    denoiser, denoiser_class = "transformer", QwenImageTransformer2DModel
    text = (TextComponent("tokenizer", "text_encoder", Qwen2_5_VLForConditionalGeneration, AutoTokenizer,
                          sequence_length_is_a_param=True, masked=True),)
    conditioning = ("prompt_embeds", MASK)
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' train_dreambooth_lora_qwen_image.py
    lora_layers_argument = "transformer_lora_layers"
    argument_reasons = {
        **Family.argument_reasons,
        "true_cfg_scale": "true classifier-free guidance against the negative prompt (the transformer has no "
                          "guidance embedding), the guidance sdpipe samples with (`evaluate.guidance_scale`'s default)",
        "negative_prompt": "the prompt the guidance steers away from: the empty prompt unless one is given "
                           "(QwenImagePipeline guides only when a negative prompt is passed)",
        "max_sequence_length": "Qwen2.5-VL's tokens per prompt after the template in training "
                               "(`model.max_sequence_length`)",
        "height": "the size it was trained at: QwenImagePipeline samples 1024 px unless told (it does not read the "
                  "transformer's recorded `sample_size`)",
    }

    def scratch_components(self, scratch: Scratch) -> dict[str, object]:
        preset = PRESETS[scratch.preset]
        tokenizer = build_qwen2_tokenizer(scratch.captions, vocab_size=scratch.vocab_size,
                                          max_tokens=scratch.max_sequence_length,
                                          prompt_template=PROMPT_TEMPLATE.format(""))
        transformer = build_transformer(preset, latent_channels=scratch.latent_channels,
                                        latent_size=scratch.latent_size)
        return {"tokenizer": tokenizer, "text_encoder": build_text_encoder(preset, tokenizer),
                "transformer": transformer}

    def training_objective(self, train: TrainParams, pretrained_scheduler: dict | None) -> FlowMatching:
        return flow_objective(train.flow, RESOLUTION_SHIFT, patch_size=PATCH,
                              pretrained_scheduler=pretrained_scheduler or SCHEDULER)

    def objective_of(self, scheduler_config: dict) -> FlowMatching:
        return flow_of(scheduler_config, patch_size=PATCH)

    def denoiser_latent_channels(self, denoiser) -> int:
        return denoiser.config.in_channels // (PATCH * PATCH)

    def token_ids(self, tokenizers: dict, captions: list[str]) -> dict[str, torch.Tensor]:
        """The templated captions, `model.max_sequence_length` tokens after the dropped template tokens."""
        tokenizer = tokenizers["tokenizer"]
        encoded = tokenizer(templated(captions), padding="max_length", truncation=True, return_tensors="pt",
                            max_length=tokenizer.model_max_length + TEMPLATE_TOKENS)
        return {"tokenizer": encoded.input_ids, attention_mask_of("tokenizer"): encoded.attention_mask}

    def encode_text(self, components: dict, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokenizer_mask = token_ids[attention_mask_of("tokenizer")]
        states = components["text_encoder"](input_ids=token_ids["tokenizer"], attention_mask=tokenizer_mask,
                                            output_hidden_states=True).hidden_states[-1]
        # right-padded: dropping the first columns drops each caption's first template tokens, as the pipeline
        # drops them from each caption's unpadded states; zero where padded, as the pipeline pads them
        mask = tokenizer_mask[:, TEMPLATE_TOKENS:].to(states.dtype)
        return {"prompt_embeds": states[:, TEMPLATE_TOKENS:] * mask[..., None], MASK: mask}

    def predict(self, denoiser, noisy, timesteps, conditioning, image_sizes) -> torch.Tensor:
        count, channels, height, width = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy, count, channels, height, width)
        prediction = denoiser(hidden_states=packed, timestep=timesteps / 1000,
                              encoder_hidden_states=conditioning["prompt_embeds"],
                              encoder_hidden_states_mask=conditioning[MASK],
                              img_shapes=[[(1, height // PATCH, width // PATCH)]] * count, return_dict=False)[0]
        # the pipeline's unpacking at a VAE scale of 1: latent pixels in, (N, C, 1, H, W) out
        return QwenImagePipeline._unpack_latents(prediction, height, width, 1).squeeze(2)

    def sampling_arguments(self, pipeline, prompts, guidance_scale, negative_prompt=None) -> dict:
        return {"prompt": prompts, "true_cfg_scale": guidance_scale,
                "negative_prompt": [negative_prompt or ""] * len(prompts),
                "max_sequence_length": pipeline.tokenizer.model_max_length, **self.trained_size(pipeline)}


FAMILY = QwenImage()
