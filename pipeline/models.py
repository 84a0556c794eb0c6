"""Build the Stable Diffusion components: tokenizer, CLIP text encoder, VAE, UNet, schedulers.

Sizes come from named presets (`model.preset`): `tiny` trains on a laptop CPU in minutes, `small` is
a starting point for a single GPU. Everything is a plain diffusers/transformers object, saved with
`save_pretrained` and loadable with no sdpipe code.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

from pipeline.config import VaeParams

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Preset:
    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    attention_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    max_tokens: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset((64, 128), 1, 4, 64, 2, 4, 24),
    "small": Preset((128, 256, 512), 2, 8, 256, 4, 4, 77),
}


def _byte_alphabet() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values (as in its byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_tokenizer(captions: Iterable[str], *, vocab_size: int, max_tokens: int) -> CLIPTokenizerFast:
    """A CLIP tokenizer whose merges are learned from the captions; unseen words fall back to bytes."""
    alphabet = _byte_alphabet()
    vocab = {symbol: index for index, symbol in enumerate(alphabet + [s + "</w>" for s in alphabet])}
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        base = CLIPTokenizerFast(
            vocab_file=str(Path(folder) / "vocab.json"),
            merges_file=str(Path(folder) / "merges.txt"),
            bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        )
        tokenizer = base.train_new_from_iterator(list(captions), vocab_size=vocab_size)
    tokenizer.model_max_length = max_tokens
    return tokenizer


def tokenize(tokenizer, captions: list[str]):
    """Token ids padded to the tokenizer's fixed length, as the pipeline pads prompts."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


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
    levels = len(preset.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=preset.unet_channels,
        layers_per_block=preset.unet_layers_per_block,
        cross_attention_dim=preset.text_width,
        attention_head_dim=preset.attention_heads,
        norm_num_groups=min(32, min(preset.unet_channels)),
    )


def training_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    # Latents are not bounded to [-1, 1]: clip_sample would ruin DDPM sampling from the saved config.
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, clip_sample=False, prediction_type=prediction_type,
    )


def sampling_scheduler(train_scheduler: DDPMScheduler) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ with the training noise schedule: good samples in 20-25 steps."""
    return DPMSolverMultistepScheduler.from_config(train_scheduler.config, algorithm_type="dpmsolver++")
