"""data/latents: what encode caches and train and evaluate read.

Per split, {split}.safetensors holds tensors `mean.<g>`, `std.<g>` (and `flip_mean.<g>`, `flip_std.<g>` when
mirrored images are encoded) for size group g, and `text_states` (finetune: the frozen text encoder's hidden
states per distinct caption, row 0 the empty prompt; their keys in the metadata `text_keys`); {split}.parquet
has one row per sample with the LATENT_COLUMNS present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

POSTERIOR = ("mean", "std")
FLIPPED = ("flip_mean", "flip_std")
TEXT_STATES = "text_states"
TEXT_KEYS = "text_keys"  # safetensors metadata: the key of every text_states row, as JSON
EMPTY_PROMPT_ROW = 0  # text_states row of the empty prompt
LATENT_COLUMNS = ("id", "caption", "group", "group_row", "latent_key", "flip_key", "text_row")


@dataclass(frozen=True)
class LatentGroup:
    """The cached posteriors of the samples of one image size."""

    rows: torch.Tensor  # these samples' positions in the split
    mean: torch.Tensor
    std: torch.Tensor
    flip_mean: torch.Tensor | None = None
    flip_std: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class CachedLatents:
    groups: list[LatentGroup]
    captions: list[str]
    ids: list[str]
    text_states: torch.Tensor | None = None  # finetune: hidden states per distinct caption
    text_rows: torch.Tensor | None = None  # each sample's row in text_states

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def flipped(self) -> bool:
        return all(group.flip_mean is not None for group in self.groups)

    def single_size(self) -> LatentGroup:
        """The one group of a split whose images all have one size (the val split always has)."""
        if len(self.groups) != 1:
            raise ValueError(f"latents: {len(self.groups)} image sizes where one was expected")
        return self.groups[0]


def load_latents(directory: Path, split: str) -> CachedLatents:
    tensors = load_file(Path(directory) / f"{split}.safetensors")
    rows = pd.read_parquet(Path(directory) / f"{split}.parquet")
    groups = []
    for group, members in rows.groupby("group", sort=True):
        order = torch.tensor(members.index.to_numpy())
        named = {name: tensors.get(f"{name}.{group}") for name in (*POSTERIOR, *FLIPPED)}
        groups.append(LatentGroup(order, **named))
    text_rows = torch.as_tensor(rows["text_row"].to_numpy()) if "text_row" in rows else None
    return CachedLatents(groups, rows["caption"].tolist(), rows["id"].tolist(), tensors.get(TEXT_STATES), text_rows)
