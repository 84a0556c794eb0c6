"""The model kept by `train.keep_best`: the weights of the sample step whose `train.sample_metric` number was best
(never the training loss, whose noise would choose at random), and early stopping after
`train.early_stopping_patience` sample steps without improvement.

At each sample step a strictly better value than the best so far (ties keep the earlier step) makes that step's
trained weights, as the samples were drawn with them (EMA weights when kept), the best: they are written to
models/checkpoints/BEST_WEIGHTS, only the trained parameters (LoRA: its layers). A checkpoint holds a hard link to
that file and the record (step, value) as of its step, and a run that resumes takes both back from it, so the best
so far is the one the checkpoint's step had seen, whatever a killed run wrote after it. The export then loads the
best weights into the trained modules.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.core.atomic import atomic_file, read_json, write_json
from pipeline.core.config import KeepBestParams

BEST_WEIGHTS = "best.safetensors"
BEST_RECORD = "best.json"


def trained_weights(modules: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The trained parameters of each module, named `<module's position>.<parameter>`, on the CPU."""
    return {f"{position}.{name}": parameter.detach().to("cpu", copy=True).contiguous()
            for position, module in enumerate(modules)
            for name, parameter in module.named_parameters() if parameter.requires_grad}


def load_trained_weights(modules: list[torch.nn.Module], weights: dict[str, torch.Tensor]) -> None:
    """Copy saved trained parameters back into the modules (the same ones trained_weights named)."""
    for position, module in enumerate(modules):
        named = dict(module.named_parameters())
        for key, value in weights.items():
            owner, name = key.split(".", 1)
            if int(owner) == position:
                with torch.no_grad():
                    named[name].copy_(value.to(named[name].device, named[name].dtype))


@dataclass
class BestKeeper:
    settings: KeepBestParams
    patience: int | None
    sample_every: int
    folder: Path  # models/checkpoints
    step: int | None = None
    value: float | None = None

    def better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.settings.mode == "max" else value < self.value

    def offer(self, step: int, metrics: dict[str, float], modules: list[torch.nn.Module]) -> bool:
        """Keep this step's weights when its metric beats the best so far; True when it did."""
        value = metrics[self.settings.metric]
        if not self.better(value):
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / BEST_WEIGHTS) as staging:
            save_file(trained_weights(modules), staging)
        self.step, self.value = step, float(value)
        return True

    def should_stop(self, step: int) -> bool:
        """Patience sample steps have passed since the best one."""
        return (self.patience is not None and self.step is not None
                and step - self.step >= self.patience * self.sample_every)

    def save_into(self, checkpoint: Path) -> None:
        """The best so far into a checkpoint being written: a hard link to its weights, and its record."""
        if self.step is None:
            return
        target = checkpoint / BEST_WEIGHTS
        try:
            os.link(self.folder / BEST_WEIGHTS, target)
        except OSError:  # a file system without hard links
            shutil.copyfile(self.folder / BEST_WEIGHTS, target)
        write_json(checkpoint / BEST_RECORD, {"step": self.step, "value": self.value, "metric": self.settings.metric})

    def restore_from(self, checkpoint: Path) -> None:
        """The best as the checkpoint's step knew it (none when it held none)."""
        (self.folder / BEST_WEIGHTS).unlink(missing_ok=True)
        self.step = self.value = None
        if (checkpoint / BEST_RECORD).is_file():
            record = read_json(checkpoint / BEST_RECORD)
            shutil.copyfile(checkpoint / BEST_WEIGHTS, self.folder / BEST_WEIGHTS)
            self.step, self.value = record["step"], record["value"]

    def load_best_into(self, modules: list[torch.nn.Module]) -> None:
        load_trained_weights(modules, load_file(self.folder / BEST_WEIGHTS))

    def metrics(self) -> dict[str, float]:
        """What train.json records of the choice."""
        return {"kept_step": self.step, f"kept_{self.settings.metric}": self.value}

    def remove(self) -> None:
        (self.folder / BEST_WEIGHTS).unlink(missing_ok=True)
