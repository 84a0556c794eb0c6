"""data/latents: what encode caches and train and evaluate read.

The cache is kept in shards that follow the processed ones: for each processed shard, encode writes up to
three safetensors files under data/latents/shards, each named by a hash of everything its values depend on
(the processed shard's name, which hashes its images' recipes; the encoder's weights; the dtype; for text,
the captions), written once and never rewritten:

- `posterior-<hash>`: tensors `mean.<h>x<w>` and `std.<h>x<w>`, the posteriors of the shard's images of
  each size;
- `flipped-<hash>`: `flip_mean.<h>x<w>` and `flip_std.<h>x<w>`, those of the mirror images
  (`encode.mirrored`, which `train.random_flip` needs);
- with `preprocess.masks`, the posterior file also holds `mask.<h>x<w>` and the flipped one `flip_mask.<h>x<w>`:
  each image's mask (of the mirror image in the flipped file) area-averaged to the latent grid, [n, 1, h', w']
  float32 in [0, 1] (1 everywhere for an image without a mask); both files' names then hash the shard's mask
  hashes too;
- `text-<hash>` (finetune): the frozen text encoders' outputs of the shard's distinct captions, one tensor per
  name the model family conditions on (`prompt_embeds`, and `pooled_prompt_embeds` for SDXL), row 0 the
  empty prompt.

In finetune mode `validation_prompts.json` names one more text file: the states of `train.validation_prompts`
(row 0 the empty prompt, then each prompt), which train's sample grid conditions on.

Each file's metadata lists what it holds (`keys`: the image ids, or a text file's captions). {split}.parquet has one row per sample
(LATENT_COLUMNS): its files, its size, its `row` in the tensors of that size, its `text_row`, its size
before preprocess with the crop's corner (IMAGE_SIZE_COLUMNS), and its `subset` (`ingest.subsets`); with the
prediction prior (`train.prior.kind: prediction`) also its `class_text_row`, the row of its class prompt in the same
text file (which then holds the class prompts too); with `preprocess.masks` also its `mask_sha256` (null: no mask).

Readers map the files rather than load them: a batch reads its samples' rows by index (the order training's
exact resume replays), so a split larger than memory trains from the page cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.contracts.data import MASK_SHA256
from pipeline.core.atomic import atomic_file, read_json, write_json
from pipeline.core.errors import UserError

POSTERIOR, FLIPPED, TEXT = "posterior", "flipped", "text"  # the kinds of latent file, and their manifest columns
POSTERIOR_TENSORS = ("mean", "std")
FLIPPED_TENSORS = ("flip_mean", "flip_std")
MASK_TENSOR, FLIPPED_MASK_TENSOR = "mask", "flip_mask"  # preprocess.masks: in the posterior and flipped files
KEYS = "keys"  # file metadata, as JSON: what a file holds, row by row (image ids; a text file's captions)
EMPTY_PROMPT_ROW = 0  # the text tensors' row of the empty prompt, in every text file
# a sample's size conditions, in the order of SDXL's time ids: its size before preprocess, the crop's top-left
# corner in the scaled image, and its size after (pixels)
IMAGE_SIZE_COLUMNS = ("original_height", "original_width", "crop_top", "crop_left", "height", "width")
LATENT_COLUMNS = ("id", "caption", "height", "width", "row", POSTERIOR, FLIPPED, TEXT, "text_row",
                  "original_height", "original_width", "crop_top", "crop_left", "subset")
CLASS_TEXT_ROW = "class_text_row"  # train.prior.kind prediction only: the row of each sample's class prompt
LATENT_SUFFIX = ".safetensors"
PROMPT_INDEX = "validation_prompts.json"  # {file: the text file of train.validation_prompts, prompts: its rows}

# safetensors dtype -> (numpy type of the same width, torch dtype); bfloat16 travels as int16
MAPPED_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                 "BF16": (np.int16, torch.bfloat16)}


def latents_fingerprint(directory: Path) -> str:
    """The identity of the cache: its manifests, which name every file by a hash of what it holds (hashing
    the files would read every latent, 128 GB for 10^6 images at 512 px)."""
    digest = hashlib.sha256()
    for manifest in sorted(Path(directory).glob("*.parquet")):
        digest.update(manifest.name.encode())
        digest.update(hashlib.sha256(manifest.read_bytes()).digest())
    return digest.hexdigest()


def size_name(height: int, width: int) -> str:
    return f"{height}x{width}"


def write_latent_file(target: Path, tensors: dict[str, torch.Tensor], keys: list[str]) -> None:
    with atomic_file(target) as staging:
        save_file({name: value.contiguous() for name, value in tensors.items()}, staging,
                  metadata={KEYS: json.dumps(keys)})


def latent_file_keys(path: Path) -> list[str] | None:
    """What a latent file holds, or None where it is missing or unreadable."""
    try:
        with safe_open(path, "pt") as handle:
            return json.loads((handle.metadata() or {}).get(KEYS, "null"))
    except (OSError, SafetensorError, ValueError):
        return None


@lru_cache(maxsize=64)  # bounds the open memory maps (one file descriptor each)
def mapped_tensors(path: Path, inode: int, mtime_ns: int) -> dict[str, tuple[np.ndarray, torch.dtype]]:
    """A safetensors file's tensors as read-only memory maps, nothing read yet (inode and mtime: a file
    written again under the same name is mapped again)."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        whole = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable latent file ({error}); run `sdpipe encode` again") from error
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        array_type, dtype = MAPPED_DTYPES[info["dtype"]]
        begin, end = (8 + length + offset for offset in info["data_offsets"])
        tensors[name] = (whole[begin:end].view(array_type).reshape(info["shape"]), dtype)
    return tensors


def mapped_tensor(path: Path, name: str) -> tuple[np.ndarray, torch.dtype]:
    try:
        stat = path.stat()
    except OSError as error:
        raise ValueError(f"{path}: missing ({error}); run `sdpipe encode` again") from error
    tensors = mapped_tensors(path, stat.st_ino, stat.st_mtime_ns)
    if name not in tensors:
        raise ValueError(f"{path}: holds no tensor {name}; run `sdpipe encode` again")
    return tensors[name]


class MappedRows:
    """One tensor's rows gathered from several files: row i is row `rows[i]` of tensor `name` in
    `files[parts[i]]`. Indexing reads just those rows."""

    def __init__(self, files: list[Path], name: str, parts: np.ndarray, rows: np.ndarray):
        self.files, self.name, self.parts, self.rows = files, name, np.asarray(parts), np.asarray(rows)

    def _mapped(self, part: int) -> tuple[np.ndarray, torch.dtype]:
        return mapped_tensor(self.files[part], self.name)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._mapped(0)[0].shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self._mapped(0)[1]

    def __getitem__(self, positions) -> torch.Tensor:
        index = np.asarray(positions)
        wanted_parts, wanted_rows = self.parts[index.ravel()], self.rows[index.ravel()]
        first, dtype = self._mapped(0)
        out = np.empty((len(wanted_rows), *first.shape[1:]), first.dtype)
        for part in np.unique(wanted_parts):
            chosen = wanted_parts == part
            out[chosen] = self._mapped(int(part))[0][wanted_rows[chosen]]
        values = torch.from_numpy(out).view(dtype)
        return values.reshape(*index.shape, *values.shape[1:])

    def load(self) -> torch.Tensor:
        """Every row, read into memory."""
        return self[np.arange(len(self))]


@dataclass(frozen=True)
class LatentGroup:
    """The cached posteriors of the samples of one image size."""

    rows: torch.Tensor  # these samples' positions in the split
    mean: MappedRows
    std: MappedRows
    flip_mean: MappedRows | None = None
    flip_std: MappedRows | None = None
    mask: MappedRows | None = None  # preprocess.masks: each sample's mask at latent resolution
    flip_mask: MappedRows | None = None  # and its mirror image's

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class CachedLatents:
    groups: list[LatentGroup]
    captions: list[str]
    ids: list[str]
    image_sizes: torch.Tensor | None = None  # per sample: original height and width, crop top and left, height, width
    text_states: dict[str, MappedRows] | None = None  # finetune: per name, the states of every text file's captions
    text_rows: torch.Tensor | None = None  # each sample's row in text_states
    subsets: list[str] | None = None  # each sample's subset (ingest.subsets; `default` without subsets)
    class_text_rows: torch.Tensor | None = None  # the prediction prior's: each sample's class prompt's row
    masked_samples: int = 0  # preprocess.masks: how many samples have a mask of their own

    def __len__(self) -> int:
        return len(self.ids)

    def text_states_of(self, samples: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached text states of these samples (positions in the split), by name."""
        rows = self.text_rows[samples]
        return {name: table[rows] for name, table in self.text_states.items()}

    @property
    def flipped(self) -> bool:
        return all(group.flip_mean is not None for group in self.groups)

    def single_size(self) -> LatentGroup:
        """The one group of a split whose images all have one size (the val split always has)."""
        if len(self.groups) != 1:
            raise ValueError(f"latents: {len(self.groups)} image sizes where one was expected")
        return self.groups[0]


def mapped_column(directory: Path, members: pd.DataFrame, column: str, name: str) -> MappedRows | None:
    """Tensor `name` of the files in `column` at the members' rows (None where the column is empty)."""
    if members[column].isna().any():
        return None
    parts, files = pd.factorize(members[column])
    return MappedRows([directory / file for file in files], name, parts, members["row"].to_numpy())


def mapped_text_states(directory: Path, rows: pd.DataFrame) -> tuple[dict[str, MappedRows], torch.Tensor]:
    """Every text file's tensors one after another, by name, and each sample's row in them (the first file's
    row 0 is the empty prompt, EMPTY_PROMPT_ROW)."""
    parts, files = pd.factorize(rows[TEXT])
    paths = [directory / file for file in files]
    names = text_tensor_names(paths[0])
    counts = [len(mapped_tensor(path, names[0])[0]) for path in paths]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    files_of_rows = np.repeat(np.arange(len(paths)), counts)
    rows_in_files = np.concatenate([np.arange(count) for count in counts])
    states = {name: MappedRows(paths, name, files_of_rows, rows_in_files) for name in names}
    return states, torch.from_numpy(starts[parts] + rows["text_row"].to_numpy())


def text_tensor_names(path: Path) -> list[str]:
    try:
        stat = path.stat()
    except OSError as error:
        raise ValueError(f"{path}: missing ({error}); run `sdpipe encode` again") from error
    return sorted(mapped_tensors(path, stat.st_ino, stat.st_mtime_ns))


def image_sizes_of(rows: pd.DataFrame) -> torch.Tensor:
    """Each sample's size conditions, as SDXL's time ids order them (float32, pixels)."""
    return torch.tensor(rows[list(IMAGE_SIZE_COLUMNS)].to_numpy(dtype=np.float32))


def load_latents(directory: Path, split: str) -> CachedLatents:
    directory = Path(directory)
    rows = pd.read_parquet(directory / f"{split}.parquet")
    groups = []
    for (height, width), members in rows.groupby(["height", "width"], sort=True):
        size = size_name(height, width)
        kinds = ((POSTERIOR, POSTERIOR_TENSORS), (FLIPPED, FLIPPED_TENSORS))
        if MASK_SHA256 in rows:
            kinds += ((POSTERIOR, (MASK_TENSOR,)), (FLIPPED, (FLIPPED_MASK_TENSOR,)))
        named = {tensor: mapped_column(directory, members, column, f"{tensor}.{size}")
                 for column, tensors in kinds for tensor in tensors}
        groups.append(LatentGroup(torch.tensor(members.index.to_numpy()), **named))
    text_states, text_rows = mapped_text_states(directory, rows) if rows[TEXT].notna().all() else (None, None)
    class_rows = None
    if text_rows is not None and CLASS_TEXT_ROW in rows:  # the same file's rows: the caption's offset moved
        class_rows = text_rows + torch.tensor((rows[CLASS_TEXT_ROW] - rows["text_row"]).to_numpy())
    masked = int(rows[MASK_SHA256].notna().sum()) if MASK_SHA256 in rows else 0
    return CachedLatents(groups, rows["caption"].tolist(), rows["id"].tolist(), image_sizes_of(rows), text_states,
                         text_rows, rows["subset"].tolist(), class_rows, masked)


class StalePromptStates(UserError, ValueError):
    """data/latents holds no states of the validation prompts train samples."""


def prompt_rows(prompts: list[str]) -> list[str]:
    """The rows of the validation prompts' text file: the empty prompt, then each prompt once."""
    return ["", *dict.fromkeys(prompts)]


def write_prompt_index(directory: Path, file: str, prompts: list[str]) -> None:
    write_json(Path(directory) / PROMPT_INDEX, {"file": file, "prompts": prompt_rows(prompts)})


def remove_prompt_index(directory: Path) -> None:
    Path(directory, PROMPT_INDEX).unlink(missing_ok=True)


def prompt_states(directory: Path, prompts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The cached text states of the prompts by name, one row per prompt in order, and the empty prompt's."""
    from safetensors.torch import load_file

    index = Path(directory) / PROMPT_INDEX
    recorded = read_json(index) if index.is_file() else {"file": "", "prompts": []}
    file = Path(directory) / recorded["file"]
    if set(prompts) - set(recorded["prompts"]) or latent_file_keys(file) != recorded["prompts"]:
        raise StalePromptStates(f"train: data/latents holds no text states of train.validation_prompts {prompts} "
                                f"({index.name}); run encode again (dvc repro encode)")
    tensors, rows = load_file(file), recorded["prompts"]
    chosen = [rows.index(prompt) for prompt in prompts]
    return ({name: values[chosen] for name, values in tensors.items()},
            {name: values[EMPTY_PROMPT_ROW] for name, values in tensors.items()})
