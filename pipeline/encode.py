"""Stage `encode`: cache the VAE posterior of every processed image once.

Training then never runs the VAE encoder: it samples latents from the cached mean and std.
Writes data/latents/{split}.safetensors (mean, std; unscaled) and {split}.parquet (id, caption)
in the same row order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_dir
from pipeline.config import EncodeParams, Paths
from pipeline.preprocess import SPLITS, load_split
from pipeline.vae import to_model_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedLatents:
    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def encode(params: EncodeParams, paths: Paths) -> dict[str, int]:
    vae = AutoencoderKL.from_pretrained(paths.vae_model).eval()
    counts = {}
    with atomic_dir(paths.latents) as staging:
        for split in SPLITS:
            images, manifest = load_split(paths, split)
            mean, std = encode_images(vae, to_model_range(images), params.batch_size)
            save_file({"mean": mean, "std": std}, staging / f"{split}.safetensors")
            manifest[["id", "caption"]].to_parquet(staging / f"{split}.parquet", index=False)
            counts[split] = len(manifest)
    log.info("encode: cached latents for %s", counts)
    return counts


def load_latents(directory: Path, split: str) -> CachedLatents:
    tensors = load_file(Path(directory) / f"{split}.safetensors")
    rows = pd.read_parquet(Path(directory) / f"{split}.parquet")
    return CachedLatents(tensors["mean"], tensors["std"], rows["caption"].tolist(), rows["id"].tolist())
