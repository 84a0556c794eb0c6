"""Stage `encode`: cache what the frozen encoders compute, once, so training never runs them.

- the VAE posterior (mean and std, unscaled) of every processed image, and of its mirror image when
  `encode.mirrored` is on (a latent of a mirrored image is not the mirrored latent; `train.random_flip` needs them);
- where preprocess kept masks (`preprocess.masks`), each image's mask area-averaged to the latent grid beside its
  posterior, and the mirror image's beside the mirrored posterior, so a flipped sample's mask is flipped with it
  (`train.masked_loss`);
- in finetune mode, the frozen text encoders' outputs of each distinct caption, as the model family
  (`model.family`) conditions on them: one named tensor each (row 0 of every text file: the empty prompt,
  which caption dropout uses), and those of `train.validation_prompts` ({trigger}: ingest.trigger), which train's
  sample grid conditions on (data/latents/validation_prompts.json names their file).

Writes data/latents as pipeline.contracts.latents lays it out: per processed shard, one file per kind, named
by a hash of everything its values depend on (the processed shard, itself named by its images' recipes; the
VAE's files or the text encoders' and tokenizers' files; `encode.dtype`; for text, the captions). data/latents persists
between runs (dvc.yaml): a file the run needs that is there already, holding what its name says, is kept;
the others are encoded; files no manifest names any more are deleted. So adding images encodes only their
shards, turning on `encode.mirrored` encodes only the mirror images, and a new VAE re-encodes everything.

Each file to encode is a Ray task (pipeline.runtime.ray_tasks): a worker loads the frozen encoder once and keeps it for
its next tasks, reads the processed shard's images a batch at a time, and writes the file. On a cluster with
GPUs every task takes one GPU, so each GPU of each node encodes its own shards; without Ray the tasks run in
this process, on its device.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pipeline.contracts.data import MANIFEST, MASK_SHA256, SPLITS, decode_png
from pipeline.contracts.latents import (
    CLASS_TEXT_ROW,
    FLIPPED,
    FLIPPED_MASK_TENSOR,
    FLIPPED_TENSORS,
    LATENT_COLUMNS,
    LATENT_SUFFIX,
    MASK_TENSOR,
    POSTERIOR,
    POSTERIOR_TENSORS,
    TEXT,
    latent_file_keys,
    prompt_rows,
    remove_prompt_index,
    size_name,
    write_latent_file,
    write_prompt_index,
)
from pipeline.contracts.paths import Paths
from pipeline.contracts.shards import IMAGE, MASK, read_members, shard_name, unreferenced_shards
from pipeline.core.atomic import atomic_file
from pipeline.core.config import EncodeParams, IngestParams, ModelParams, RayParams, TrainParams
from pipeline.core.prior_params import PREDICTION_PRIOR
from pipeline.core.source_params import with_trigger
from pipeline.core.hashing import folder_hash
from pipeline.diffusion.components import component_folder
from pipeline.diffusion.families import family_named
from pipeline.diffusion.latent_space import load_vae
from pipeline.diffusion.vae_io import encode_images, to_model_range
from pipeline.runtime.device import compute_device, cpu_forced
from pipeline.runtime.ray_tasks import run_tasks

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Encoder:
    """Where a task loads a frozen encoder from, and the identity of its weights (cache keys name it)."""

    location: str  # the VAE's folder, or the pretrained model whose text encoders are meant
    root: Path  # the project, against which a pretrained model's local path resolves
    key: str
    dtype: str
    family: str | None = None  # text: the model family, which says what its encoders give
    max_sequence_length: int = 77  # text: T5's tokens per caption (sd3, flux)


@dataclass(frozen=True)
class LatentTask:
    """A Ray task: encode one processed shard's images (or its captions) into one latent file."""

    kind: str  # POSTERIOR, FLIPPED or TEXT
    source: Path  # the processed shard
    target: Path  # the latent file
    keys: tuple[str, ...]  # the shard's image ids, in manifest order; TEXT: the captions, in row order
    encoder: Encoder
    batch_size: int
    masks: bool = False  # POSTERIOR, FLIPPED: the processed shard holds masks (preprocess.masks); cache them too


@lru_cache(maxsize=1)  # a worker keeps the encoder for its next tasks; new weights have a new key
def loaded_vae(encoder: Encoder):
    return load_vae(encoder.location, torch_dtype=DTYPES[encoder.dtype]).to(compute_device()).eval()


@lru_cache(maxsize=1)
def loaded_text_encoders(encoder: Encoder) -> dict[str, object]:
    """The family's tokenizers and frozen text encoders, the encoders read from their files in the cache's dtype,
    on the device."""
    family = family_named(encoder.family)
    text = family.load_text(encoder.location, encoder.root, encoder.max_sequence_length, dtype=DTYPES[encoder.dtype])
    for part in family.text:
        text[part.encoder] = text[part.encoder].to(compute_device())
    return text


def masks_at_latent_size(masks: list[bytes | None], image_size: tuple[int, int], latent_size: tuple[int, int],
                          mirrored: bool) -> torch.Tensor:
    """Masks (PNG bytes of "L" images of `image_size` (height, width); None: no mask, 1 everywhere) as [n, 1, h, w]
    float32 in [0, 1] on the latent grid: each latent pixel the mean of the image pixels it covers (area
    averaging), of the mirror image's mask when `mirrored`."""
    pixels = np.stack([np.full(image_size, 255, np.uint8) if mask is None else decode_png(mask) for mask in masks])
    if mirrored:
        pixels = pixels[:, :, ::-1]
    full = torch.from_numpy(np.ascontiguousarray(pixels)).float().div(255).unsqueeze(1)
    return F.interpolate(full, size=latent_size, mode="area")


@torch.no_grad()
def encode_posteriors(task: LatentTask) -> dict[str, torch.Tensor]:
    """Mean and std of each image (mirrored for FLIPPED) by size: {`mean.<h>x<w>`: [n, ...], ...}, rows in
    the order of the task's ids; decoded a batch at a time. With task.masks, the masks on the latent grid too
    (`mask.<h>x<w>`, or `flip_mask.<h>x<w>`)."""
    vae, mirrored = loaded_vae(task.encoder), task.kind == FLIPPED
    names = FLIPPED_TENSORS if mirrored else POSTERIOR_TENSORS
    tensors = {}
    images = read_members(task.source, task.keys, [IMAGE, "height", "width", *([MASK] if task.masks else [])])
    for (height, width), members in images.groupby(["height", "width"], sort=True):
        parts = []
        for start in range(0, len(members), task.batch_size):
            batch = np.stack([decode_png(data) for data in members[IMAGE].iloc[start : start + task.batch_size]])
            if mirrored:
                batch = batch[:, :, ::-1]  # NHWC: left to right
            parts.append(encode_images(vae, to_model_range(np.ascontiguousarray(batch)), task.batch_size))
        for name, values in zip(names, zip(*parts, strict=True), strict=True):
            tensors[f"{name}.{size_name(height, width)}"] = torch.cat(values)
        if task.masks:
            latent_size = tuple(tensors[f"{names[0]}.{size_name(height, width)}"].shape[-2:])
            tensors[f"{FLIPPED_MASK_TENSOR if mirrored else MASK_TENSOR}.{size_name(height, width)}"] = \
                masks_at_latent_size(members[MASK].tolist(), (height, width), latent_size, mirrored)
    return tensors


@torch.no_grad()
def encode_captions(family_name: str, text: dict[str, object], captions: list[str],
                    batch_size: int) -> dict[str, torch.Tensor]:
    """The family's conditioning tensors of the captions, by name, on the CPU."""
    family, device = family_named(family_name), compute_device()
    parts = []
    for start in range(0, len(captions), batch_size):
        ids = family.token_ids(text, captions[start : start + batch_size])
        encoded = family.encode_text(text, {name: value.to(device) for name, value in ids.items()})
        parts.append({name: value.cpu() for name, value in encoded.items()})
    return {name: torch.cat([part[name] for part in parts]) for name in family.conditioning}


def encode_file(task: LatentTask) -> list[dict]:
    if task.kind == TEXT:
        tensors = encode_captions(task.encoder.family, loaded_text_encoders(task.encoder), list(task.keys),
                                  task.batch_size)
    else:
        tensors = encode_posteriors(task)
    write_latent_file(task.target, tensors, list(task.keys))
    return []


def text_encoder_of(model: ModelParams, paths: Paths, dtype: str) -> Encoder | None:
    """The pretrained model's text encoders in finetune mode; scratch mode trains its own (nothing to cache).
    The key names the family (what is computed from the encoders), T5's sequence length and the files of every
    tokenizer and encoder, hashed as stored (no weights are loaded here; the tasks load them)."""
    if model.mode != "finetune":
        return None
    family = family_named(model.family)
    digest = hashlib.sha256(family.name.encode())
    if any(part.sequence_length_is_a_param for part in family.text):
        digest.update(f"max_sequence_length={model.max_sequence_length}".encode())
    for part in family.text:
        for component in (part.tokenizer, part.encoder):
            digest.update(f"{component}={folder_hash(component_folder(model.pretrained, paths.root, component))}".encode())
    return Encoder(model.pretrained, paths.root, digest.hexdigest(), dtype, family.name, model.max_sequence_length)


ClassCaption = Callable[[str], str]  # the prediction prior's class prompt of a caption


def split_plan(manifest: pd.DataFrame, vae: Encoder, text: Encoder | None, mirrored: bool,
               class_caption: ClassCaption | None = None) -> pd.DataFrame:
    """The split's latent manifest: each sample's files (named by their keys, with the shard's mask hashes where
    preprocess kept masks), its row among the shard's images of its size and its row in the shard's text states
    (and that of its class prompt, with `class_caption`)."""
    plan = manifest.assign(row=manifest.groupby(["shard", "height", "width"], sort=False).cumcount(),
                           **{POSTERIOR: None, FLIPPED: None, TEXT: None, "text_row": -1},
                           **({CLASS_TEXT_ROW: -1} if class_caption is not None else {}))
    for shard, members in manifest.groupby("shard", sort=False):
        at = members.index
        image_keys = [shard, vae.key, vae.dtype, *mask_keys(members)]
        plan.loc[at, POSTERIOR] = shard_name(POSTERIOR, image_keys, LATENT_SUFFIX)
        if mirrored:
            plan.loc[at, FLIPPED] = shard_name(FLIPPED, image_keys, LATENT_SUFFIX)
        if text is not None:
            captions = shard_captions(members["caption"], class_caption)
            rows = {caption: row for row, caption in enumerate(captions)}
            plan.loc[at, TEXT] = shard_name(TEXT, [text.key, text.dtype, *captions], LATENT_SUFFIX)
            plan.loc[at, "text_row"] = members["caption"].map(rows)
            if class_caption is not None:
                plan.loc[at, CLASS_TEXT_ROW] = members["caption"].map(class_caption).map(rows)
    return plan


def mask_keys(members: pd.DataFrame) -> list[str]:
    """What the shard's masks add to its image files' names: nothing without preprocess.masks (so a run without
    masks keeps its cache), else each sample's mask hash ("none" where it has no mask)."""
    if MASK_SHA256 not in members:
        return []
    return ["masks", *members[MASK_SHA256].fillna("none").tolist()]


def shard_captions(captions: pd.Series, class_caption: ClassCaption | None = None) -> list[str]:
    """The rows of a text file: the empty prompt, then each distinct caption once (then the class prompts that are
    not captions already)."""
    classes = [class_caption(caption) for caption in captions] if class_caption is not None else []
    return ["", *dict.fromkeys(caption for caption in [*captions, *classes] if caption)]


def class_caption_of(train: TrainParams, ingest: IngestParams) -> ClassCaption | None:
    """The prediction prior's class prompt of a caption (train.prior); None for other runs, whose text files hold
    their captions alone."""
    prior = train.prior
    if prior.kind != PREDICTION_PRIOR:
        return None
    return lambda caption: prior.class_caption(caption, ingest.trigger)


def tasks_of(plan: pd.DataFrame, vae: Encoder, text: Encoder | None, settings: EncodeParams,
             paths: Paths, class_caption: ClassCaption | None = None) -> list[LatentTask]:
    """One task per file the plan names, in plan order (each file once)."""
    tasks = {}
    for shard, members in plan.groupby("shard", sort=False):
        ids = tuple(members["id"])
        for kind in (POSTERIOR, FLIPPED, TEXT):
            file = members[kind].iat[0]
            if pd.isna(file) or file in tasks:
                continue
            keys, encoder = (tuple(shard_captions(members["caption"], class_caption)), text) if kind == TEXT \
                else (ids, vae)
            tasks[file] = LatentTask(kind, paths.processed / shard, paths.latents / file, keys, encoder,
                                     settings.batch_size, masks=kind != TEXT and MASK_SHA256 in members)
    return list(tasks.values())


def counted(tasks: list[LatentTask], kinds: tuple[str, ...]) -> int:
    return sum(len(task.keys) for task in tasks if task.kind in kinds)


def validation_prompt_task(prompts: list[str], text: Encoder | None, settings: EncodeParams,
                           paths: Paths) -> LatentTask | None:
    """The text file of train.validation_prompts' states (finetune), named by them and the text encoders."""
    if text is None or not prompts:
        return None
    rows = prompt_rows(prompts)
    target = paths.latents / shard_name(TEXT, [text.key, text.dtype, *rows], LATENT_SUFFIX)
    return LatentTask(TEXT, paths.processed, target, tuple(rows), text, settings.batch_size)


def encode(paths: Paths, *, encode: EncodeParams, model: ModelParams, ray: RayParams = RayParams(),
           train: TrainParams = TrainParams(), ingest: IngestParams = IngestParams()) -> dict[str, int]:
    """Returns the samples per split, how many latents (images, mirrored ones counted apart) were encoded and
    reused, and the cache's size in bytes: image latents and caption states. `train` and `ingest`: the
    prediction prior's class prompts (train.prior, ingest.trigger) are cached beside the captions."""
    vae = Encoder(str(paths.vae_model), paths.root, folder_hash(paths.vae_model), encode.dtype)
    text = text_encoder_of(model, paths, encode.dtype)
    class_caption = class_caption_of(train, ingest)
    plans = {split: split_plan(pd.read_parquet(paths.processed / split / MANIFEST), vae, text, encode.mirrored,
                               class_caption) for split in SPLITS}
    tasks = [task for plan in plans.values() for task in tasks_of(plan, vae, text, encode, paths, class_caption)]
    prompts = with_trigger(train.validation_prompts, ingest.trigger)
    prompt_task = validation_prompt_task(prompts, text, encode, paths)
    todo = [task for task in [*tasks, *filter(None, [prompt_task])] if latent_file_keys(task.target) != list(task.keys)]
    run_tasks(encode_file, todo, ray, "encode", gpu=not cpu_forced())
    for split, plan in plans.items():
        with atomic_file(paths.latents / f"{split}.parquet") as staging:
            columns = [*LATENT_COLUMNS, *([CLASS_TEXT_ROW] if class_caption is not None else []),
                       *([MASK_SHA256] if MASK_SHA256 in plan else [])]
            plan[columns].to_parquet(staging, index=False)
    referenced = pd.concat([plan[kind] for plan in plans.values() for kind in (POSTERIOR, FLIPPED, TEXT)]).dropna()
    if prompt_task is None:
        remove_prompt_index(paths.latents)
    else:
        write_prompt_index(paths.latents, prompt_task.target.relative_to(paths.latents).as_posix(), prompts)
        referenced = pd.concat([referenced, pd.Series([prompt_task.target.relative_to(paths.latents).as_posix()])])
    # and the one-file-per-split cache of earlier versions, which nothing reads any more
    for stale in [*unreferenced_shards(paths.latents, referenced), *paths.latents.glob("*.safetensors")]:
        stale.unlink()
    images = (POSTERIOR, FLIPPED)
    counts = {split: len(plan) for split, plan in plans.items()}
    counts.update(encoded=counted(todo, images), reused=counted(tasks, images) - counted(todo, images),
                  image_cache_bytes=cache_bytes(tasks, images), text_cache_bytes=cache_bytes(tasks, (TEXT,)))
    log.info("encode: %s samples; latents %d encoded, %d reused from the last run%s; cache %.1f MiB of latents%s",
             {split: counts[split] for split in SPLITS}, counts["encoded"], counts["reused"],
             f"; caption states {counted(todo, (TEXT,))} encoded, {counted(tasks, (TEXT,)) - counted(todo, (TEXT,))} "
             "reused" if text else "", counts["image_cache_bytes"] / 2**20,
             f", {counts['text_cache_bytes'] / 2**20:.1f} MiB of caption states" if text else "")
    return counts


def cache_bytes(tasks: list[LatentTask], kinds: tuple[str, ...]) -> int:
    """The size on disk of the run's latent files of these kinds (each file once)."""
    return sum(task.target.stat().st_size for task in tasks if task.kind in kinds)
