"""Build the Stable Diffusion components: tokenizer, CLIP text encoder, VAE, UNet, schedulers.

Sizes come from named presets (`model.preset`): `tiny` trains on a laptop CPU in minutes, `small` is
a starting point for a single GPU. Everything is a plain diffusers/transformers object, saved with
`save_pretrained` and loadable with no sdpipe code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

from pipeline.config import VaeParams

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"  # CLIP's BPE marks a word's last symbol
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
    """A CLIP tokenizer whose merges build the captions' most frequent words whole; unseen words fall
    back to byte-level characters. Deterministic: the same captions always give the same token ids
    (the Rust BPE trainer breaks ties by hash order, which changes from process to process)."""
    alphabet = _byte_alphabet()
    symbols = alphabet + [s + WORD_END for s in alphabet]
    base = _clip_tokenizer({symbol: index for index, symbol in enumerate(symbols)}, [], max_tokens)
    merges = _whole_word_merges(_word_counts(base, captions), budget=vocab_size - len(symbols) - 2)
    vocab = {symbol: index for index, symbol in enumerate(symbols + ["".join(pair) for pair in merges])}
    return _clip_tokenizer(vocab, merges, max_tokens)


def _clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], max_tokens: int) -> CLIPTokenizerFast:
    tokenizer = CLIPTokenizerFast(
        vocab={**vocab, BOS: len(vocab), EOS: len(vocab) + 1}, merges=merges,
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )
    tokenizer.model_max_length = max_tokens
    return tokenizer


def _word_counts(tokenizer: CLIPTokenizerFast, captions: Iterable[str]) -> Counter:
    """Words as CLIP's own normaliser and pre-tokeniser cut them (byte-level characters)."""
    backend = tokenizer.backend_tokenizer
    return Counter(
        word
        for caption in captions
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption))
    )


def _whole_word_merges(counts: Counter, budget: int) -> list[tuple[str, str]]:
    """Left-to-right merge chains that assemble whole words, most frequent words first (ties by the
    word itself), until `budget` new tokens are used."""
    merges: list[tuple[str, str]] = []
    known: set[str] = set()
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        pieces = list(word[:-1]) + [word[-1] + WORD_END]
        chain = []
        for piece in pieces[1:]:
            chain.append((pieces[0] if not chain else "".join(chain[-1]), piece))
        new = [pair for pair in chain if "".join(pair) not in known]
        if len(merges) + len(new) > budget:
            break
        merges.extend(new)
        known.update("".join(pair) for pair in new)
    return merges


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
