"""The pieces every model family builds from or loads with: CLIP and T5 text-encoder configs, and
loading a pretrained diffusers model's components (`model.pretrained`: a folder or a hub id).

Each family's own components and presets are in pipeline.diffusion.families; scratch mode's tokenizer is
pipeline.diffusion.tokenizer's; pixels to latents, vae_io's; the VAE and its latents' normalisation,
latent_space's. Everything is a plain diffusers/transformers
object, saved with `save_pretrained` and loadable with no sdpipe code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTokenizerFast, T5Config, T5TokenizerFast

from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError

PIPELINE_INDEX = "model_index.json"
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # safetensors' names


def clip_text_config(tokenizer: CLIPTokenizerFast, width: int, layers: int, heads: int,
                     projection_dim: int | None = None) -> CLIPTextConfig:
    """A CLIP text encoder's config for a tokenizer: its vocabulary, special tokens and fixed length."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )


def t5_encoder_config(tokenizer: T5TokenizerFast, width: int, layers: int, heads: int, feed_forward: int,
                      dropout: float) -> T5Config:
    """A T5 (v1.1, gated-GELU) encoder's config for a tokenizer: its vocabulary and special tokens."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // heads,
        d_ff=feed_forward,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )


def pretrained_location(spec: str, root: Path) -> str:
    """`model.pretrained` as from_pretrained takes it: a diffusers folder (relative to the project root unless
    absolute), else a hub id, which must already be in the Hugging Face cache when the hub is offline."""
    folder = Paths(root).input(spec)
    if folder.is_dir():
        if not (folder / PIPELINE_INDEX).is_file():
            raise ConfigError(f"model.pretrained: {folder} is not a diffusers folder (no {PIPELINE_INDEX})")
        return str(folder)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ConfigError(f"model.pretrained: {spec!r} is neither a folder here nor a hub id like owner/name")
    return spec


def load_pretrained(spec: str, root: Path, component: str, loader, **options):
    """One component (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`) of a pretrained model; `options`
    go to the loader (`torch_dtype`: the weights are read from their files straight into it)."""
    location = pretrained_location(spec, root)
    try:
        return loader(location, subfolder=component, **options)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.pretrained: cannot load {component} of {spec!r}: "
                          f"{unavailable(spec, root, location)} ({error})") from None


def unavailable(spec: str, root: Path, location: str) -> str:
    """Why a pretrained model's component could not be read: where it was looked for."""
    if location == spec:
        return (f"there is no folder {Path(root).resolve() / spec}, and as a hub id it needs the network or the "
                "Hugging Face cache (the Makefile sets HF_HUB_OFFLINE=1; unset it to download)")
    return f"the folder {location} lacks it"


def pretrained_folder(spec: str, root: Path) -> Path:
    """The local folder of a pretrained model: the folder itself, or a hub id's snapshot in the Hugging Face cache
    (the files from_pretrained reads, downloaded first when the hub is online)."""
    location = pretrained_location(spec, root)
    if Path(location).is_dir():
        return Path(location)
    try:
        return Path(DiffusionPipeline.download(spec))
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.pretrained: cannot find the files of {spec!r}: {unavailable(spec, root, spec)} "
                          f"({error})") from None


def component_folder(spec: str, root: Path, component: str) -> Path:
    folder = pretrained_folder(spec, root) / component
    if not folder.is_dir():
        raise ConfigError(f"model.pretrained: {spec!r} has no {component} folder ({folder})")
    return folder


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype a model folder's weights are stored in (its safetensors files, variants such as `.fp16` aside);
    float32 where there are none."""
    stored = sorted(path for path in folder.glob("*.safetensors") if path.name.count(".") == 1)
    if not stored:
        return torch.float32
    with safe_open(stored[0], "pt") as handle:
        names = list(handle.keys())
        return STORED_DTYPES.get(handle.get_slice(names[0]).get_dtype(), torch.float32) if names else torch.float32


def pretrained_scheduler_config(spec: str, root: Path) -> dict:
    return dict(load_pretrained(spec, root, "scheduler", DDPMScheduler.load_config))
