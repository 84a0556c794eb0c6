"""Stage `encode`: cache what the frozen encoders compute, once, so training never runs them.

- the VAE posterior (mean and std, unscaled) of every processed image, and of its mirror image when
  `train.random_flip` is on (a latent of a mirrored image is not the mirrored latent);
- in finetune mode, the frozen text encoder's hidden states of every distinct caption (row 0: the empty
  prompt, which caption dropout uses).

Each cached value has a key made of everything it depends on: a latent's key is the processed file's
sha256 (from the processed manifest), the image size, the crop, the VAE and the dtype; a caption's key is the caption, the text encoder
and the dtype. data/latents persists between runs (dvc.yaml), so a re-run reuses every value whose key
it already holds and encodes only the rest: added images, or everything after the VAE changed.

Writes data/latents/{split}.safetensors and {split}.parquet (id, caption, size group, row within the
group, keys, text row). Images of one size form a group (one group unless preprocess buckets by aspect
ratio): tensors `mean.<g>`, `std.<g>` (and `flip_mean.<g>`, `flip_std.<g>`) hold group g's samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_dir
from pipeline.config import EncodeParams, ModelParams, TrainParams
from pipeline.contracts.data import SPLITS, load_split_groups
from pipeline.contracts.latents import FLIPPED, LATENT_COLUMNS, POSTERIOR, TEXT_KEYS, TEXT_STATES
from pipeline.contracts.paths import Paths
from pipeline.device import compute_device
from pipeline.models import encode_images, load_frozen_text_encoder, to_model_range, tokenize
from pipeline.tracking import folder_hash, module_hash

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def my_share(items: list[int], processes: int, process: int) -> list[int]:
    """This process's part of the work under `accelerate launch`: every processes-th item, from its index."""
    return items[process::processes]


class KeyedCache:
    """Values of a previous run by key; `take` returns cached rows and encodes only the missing ones, split
    over the processes of `accelerate launch` (each encodes its share, all receive every value)."""

    def __init__(self, values: dict[str, torch.Tensor]):
        self.values, self.reused, self.encoded = values, 0, 0

    def take(self, keys: list[str], encode_missing) -> torch.Tensor:
        missing = [i for i, key in enumerate(keys) if key not in self.values]
        if missing:
            state = PartialState()
            mine = my_share(missing, state.num_processes, state.process_index)
            encoded = list(zip(mine, encode_missing(mine), strict=True)) if mine else []
            for i, value in gather_object(encoded):
                self.values[keys[i]] = value
        self.encoded += len(missing)
        self.reused += len(keys) - len(missing)
        return torch.stack([self.values[key] for key in keys])


def previous_values(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Latents and text states of the last run, by key (nothing when data/latents is new or from before keys)."""
    latents, texts = {}, {}
    for split in SPLITS:
        tensors_file, rows_file = folder / f"{split}.safetensors", folder / f"{split}.parquet"
        if not (tensors_file.is_file() and rows_file.is_file()):
            continue
        rows = pd.read_parquet(rows_file)
        if "latent_key" not in rows:
            continue
        tensors = load_file(tensors_file)
        for group, members in rows.groupby("group"):
            for names, key_column in ((POSTERIOR, "latent_key"), (FLIPPED, "flip_key")):
                if f"{names[0]}.{group}" not in tensors:
                    continue
                stacked = torch.stack([tensors[f"{name}.{group}"] for name in names], dim=1)
                latents.update(zip(members[key_column], stacked[members["group_row"].to_numpy()], strict=True))
        with safe_open(tensors_file, "pt") as handle:
            keys = json.loads((handle.metadata() or {}).get(TEXT_KEYS, "[]"))
        if keys:
            texts.update(zip(keys, tensors[TEXT_STATES], strict=True))
    return latents, texts


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], batch_size: int) -> torch.Tensor:
    states = [text_encoder(tokenize(tokenizer, captions[i : i + batch_size]).to(text_encoder.device))[0].cpu()
              for i in range(0, len(captions), batch_size)]
    return torch.cat(states).contiguous()


@dataclass(frozen=True)
class FrozenTextEncoder:
    tokenizer: object
    model: torch.nn.Module
    key: str  # the identity of its weights


def encode_group(images: np.ndarray, rows: pd.DataFrame, vae: AutoencoderKL, vae_key: str,
                 settings: EncodeParams, random_flip: bool, cache: KeyedCache) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Posteriors of one size group (both orientations when flipping) as {name: [n, ...]}, and their keys."""
    height, width = images.shape[1:3]

    def keys(flipped: bool) -> list[str]:
        return [key_of("latent", digest, width, height, crop, vae_key, settings.dtype, flipped)
                for digest, crop in zip(rows["sha256"], rows["crop"], strict=True)]

    def encoder(source: np.ndarray):
        def encode_rows(missing: list[int]) -> torch.Tensor:
            batch = to_model_range(np.ascontiguousarray(source[missing]))
            return torch.stack(encode_images(vae, batch, settings.batch_size), dim=1)
        return encode_rows

    orientations = {"latent_key": (POSTERIOR, images)}
    if random_flip:
        orientations["flip_key"] = (FLIPPED, images[:, :, ::-1])  # NHWC: mirrored left to right
    tensors, key_columns = {}, {}
    for column, (names, source) in orientations.items():
        key_columns[column] = keys(flipped=column == "flip_key")
        posterior = cache.take(key_columns[column], encoder(source))
        tensors |= {name: part.contiguous() for name, part in zip(names, posterior.unbind(1), strict=True)}
    return tensors, key_columns


def cache_captions(captions: list[str], text_encoder: FrozenTextEncoder, settings: EncodeParams,
                   cache: KeyedCache) -> tuple[torch.Tensor, list[str], list[int]]:
    """Hidden states of the distinct captions (row 0: the empty prompt), their keys, and each caption's row."""
    distinct = ["", *dict.fromkeys(caption for caption in captions if caption)]
    keys = [key_of("caption", caption, text_encoder.key, settings.dtype) for caption in distinct]
    states = cache.take(keys, lambda missing: encode_captions(
        text_encoder.tokenizer, text_encoder.model, [distinct[i] for i in missing], settings.batch_size))
    row_of = {caption: row for row, caption in enumerate(distinct)}
    return states, keys, [row_of[caption] for caption in captions]


def frozen_text_encoder(model: ModelParams, paths: Paths, dtype: torch.dtype,
                        device: torch.device) -> FrozenTextEncoder | None:
    """The pretrained model's text encoder in finetune mode; scratch mode trains its own (nothing to cache)."""
    if model.mode != "finetune":
        return None
    tokenizer, text_encoder = load_frozen_text_encoder(model.pretrained, paths.root)
    key = module_hash(text_encoder.to(dtype))  # before the move: hashing reads the weights on the CPU
    return FrozenTextEncoder(tokenizer, text_encoder.to(device), key=key)


@dataclass
class EncodedSplit:
    tensors: dict[str, torch.Tensor]
    manifest: pd.DataFrame
    metadata: dict[str, str] | None

    def write(self, split: str, staging: Path) -> None:
        save_file(self.tensors, staging / f"{split}.safetensors", metadata=self.metadata)
        columns = [c for c in LATENT_COLUMNS if c in self.manifest]
        self.manifest[columns].to_parquet(staging / f"{split}.parquet", index=False)


def encode_split(split: str, settings: EncodeParams, random_flip: bool, paths: Paths, vae: AutoencoderKL,
                 vae_key: str, text_encoder: FrozenTextEncoder | None, latents: KeyedCache,
                 texts: KeyedCache) -> EncodedSplit:
    tensors, parts = {}, []
    for group, (images, rows) in enumerate(load_split_groups(paths, split)):
        encoded, key_columns = encode_group(images, rows, vae, vae_key, settings, random_flip, latents)
        tensors |= {f"{name}.{group}": value for name, value in encoded.items()}
        parts.append(rows.assign(group=group, group_row=np.arange(len(rows)), **key_columns))
    manifest = pd.concat(parts, ignore_index=True)
    metadata = None
    if text_encoder is not None:
        tensors[TEXT_STATES], text_keys, manifest["text_row"] = cache_captions(
            manifest["caption"].tolist(), text_encoder, settings, texts)
        metadata = {TEXT_KEYS: json.dumps(text_keys)}
    return EncodedSplit(tensors, manifest, metadata)


def encode(paths: Paths, *, encode: EncodeParams, model: ModelParams, train: TrainParams) -> dict[str, int]:
    """Run by one process, or by each of `accelerate launch`'s: they share the encoding, the main one writes."""
    dtype, device, state = DTYPES[encode.dtype], compute_device(), PartialState()
    vae = AutoencoderKL.from_pretrained(paths.vae_model, torch_dtype=dtype).to(device).eval()
    text_encoder = frozen_text_encoder(model, paths, dtype, device)
    vae_key = folder_hash(paths.vae_model)
    latents, texts = (KeyedCache(values) for values in previous_values(paths.latents))
    splits = {split: encode_split(split, encode, train.random_flip, paths, vae, vae_key, text_encoder, latents, texts)
              for split in SPLITS}
    if state.is_main_process:
        with atomic_dir(paths.latents) as staging:
            for split, encoded in splits.items():
                encoded.write(split, staging)
    state.wait_for_everyone()
    counts = {split: len(encoded.manifest) for split, encoded in splits.items()}
    log.info("encode: %s samples; latents %d encoded, %d reused from the last run%s", counts, latents.encoded,
             latents.reused, f"; caption states {texts.encoded} encoded, {texts.reused} reused" if text_encoder else "")
    return dict(counts, encoded=latents.encoded, reused=latents.reused)
