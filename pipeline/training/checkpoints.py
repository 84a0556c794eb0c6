"""Training checkpoints: what a run saves every `train.checkpoint_every` steps, and which one it resumes.

A checkpoint is accelerate's `save_state` folder (modules, optimizer, LR schedule, EMA, and the run's
`Progress`) plus a fingerprint of everything its validity depends on. A run resumes only from a
checkpoint with its own fingerprint, so a changed setting, data set or VAE never continues a stale run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from pipeline.contracts.latents import latents_fingerprint
from pipeline.contracts.paths import Paths
from pipeline.core.atomic import read_json, write_json
from pipeline.core.config import ModelParams, TrainParams
from pipeline.core.hashing import folder_hash

CHECKPOINT_PREFIX = "step-"
FINGERPRINT = "fingerprint.json"
LORA_CHECKPOINT = "lora.safetensors"  # a LoRA checkpoint's trained weights (the frozen base UNet is not saved)
# Settings that change what is logged, not what is learned: a checkpoint stays valid when they change.
OBSERVABILITY_SETTINGS = ("log_every", "validate_every", "validation_timesteps", "sample_every", "sample_steps",
                          "checkpoint_every", "checkpoints_kept")


@dataclass
class Progress:
    """What a checkpoint holds beyond the modules and optimizer: where the run is and what it saw."""

    step: int = 0
    curve: list[list[float]] = field(default_factory=list)
    data_digest: str = hashlib.sha256().hexdigest()
    mlflow_run_id: str | None = None

    def saw(self, group: int, positions: torch.Tensor) -> None:
        record = f"{group}:".encode() + positions.numpy().tobytes()
        self.data_digest = hashlib.sha256(self.data_digest.encode() + record).hexdigest()

    def state_dict(self) -> dict:
        return dict(step=self.step, curve=self.curve, data_digest=self.data_digest, mlflow_run_id=self.mlflow_run_id)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.curve = state["step"], [list(point) for point in state["curve"]]
        self.data_digest, self.mlflow_run_id = state["data_digest"], state["mlflow_run_id"]


def training_fingerprint(model: ModelParams, train: TrainParams, paths: Paths, processes: int) -> dict:
    """Everything a checkpoint's validity depends on: the learning settings, the model, the data, the VAE."""
    settings = train.model_dump(mode="json", exclude=set(OBSERVABILITY_SETTINGS))
    return dict(train=settings, model=model.model_dump(mode="json"), latents=latents_fingerprint(paths.latents),
                vae=folder_hash(paths.vae_model), processes=processes)


def checkpoint_folders(paths: Paths) -> list[Path]:
    """Finished checkpoints, oldest first (names are zero-padded steps)."""
    if not paths.checkpoints.is_dir():
        return []
    return sorted(p for p in paths.checkpoints.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir())


def resumable_checkpoint(paths: Paths, fingerprint: dict, steps: int) -> Path | None:
    """The newest checkpoint of this configuration that is short of the last step. A finished run is not
    resumed: running the stage again (after a code change, or `dvc repro -f`) trains afresh."""
    for folder in reversed(checkpoint_folders(paths)):
        if (folder / FINGERPRINT).is_file() and read_json(folder / FINGERPRINT) == fingerprint:
            return None if int(folder.name.removeprefix(CHECKPOINT_PREFIX)) >= steps else folder
    return None


def save_checkpoint(accelerator: Accelerator, paths: Paths, step: int, fingerprint: dict, kept: int,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """save_state into a hidden folder, then renamed: a kill mid-write never leaves a broken checkpoint.
    `extra` writes more of the run's state into the folder before the rename (on the main process).
    Checkpoints of another configuration, which could never be resumed, are removed."""
    target = paths.checkpoints / f"{CHECKPOINT_PREFIX}{step:07d}"
    staging = paths.checkpoints / f".{target.name}.partial"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(staging)
        write_json(staging / FINGERPRINT, fingerprint)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        same = [f for f in checkpoint_folders(paths)
                if (f / FINGERPRINT).is_file() and read_json(f / FINGERPRINT) == fingerprint]
        for folder in set(checkpoint_folders(paths)) - set(same[-kept:]):
            shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    return target


def remove_checkpoints(paths: Paths, fingerprint: dict) -> None:
    """A finished run's checkpoints: never resumed (the stage run again trains afresh), so not kept."""
    for folder in checkpoint_folders(paths):
        if (folder / FINGERPRINT).is_file() and read_json(folder / FINGERPRINT) == fingerprint:
            shutil.rmtree(folder)


def save_lora_checkpoints_only(accelerator: Accelerator) -> None:
    """LoRA checkpoints hold the LoRA weights (and, as always, their optimizer state), not the frozen base UNet:
    accelerate's save/load hooks, as diffusers' LoRA training scripts use them."""

    def save(models: list, weights: list, folder: str) -> None:
        if accelerator.is_main_process:
            save_file(get_peft_model_state_dict(accelerator.unwrap_model(models[0])), Path(folder) / LORA_CHECKPOINT)
        weights.clear()  # accelerate saves no full UNet

    def load(models: list, folder: str) -> None:
        unet = accelerator.unwrap_model(models.pop())
        loaded = set_peft_model_state_dict(unet, load_file(Path(folder) / LORA_CHECKPOINT, device=str(unet.device)))
        if loaded.unexpected_keys:
            raise ValueError(f"train: {folder} holds weights of other LoRA layers: {loaded.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
