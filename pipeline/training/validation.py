"""Validation samples that show the subject being learned: `train.validation_prompts` ({trigger} replaced by
ingest.trigger), each sampled at every seed of `train.validation_seeds`, every `train.sample_every` steps.

The grid logged to MLflow has one row per (prompt, seed) and two columns: the base model's image (rendered once,
before the first update: the pretrained model in finetune mode, the initial weights from scratch; under LoRA with
the adapters disabled, so a resumed run renders it again) beside the current model's. `train.sample_metric` scores
the current images at each of those steps (and the base's, logged at step 0), which `pipeline.training.best`
follows. A run that resumes takes the base column from its checkpoint (BASE_COLUMN), so it is the same images.

In finetune mode the prompts condition the sampler through their text states cached by encode
(pipeline.contracts.latents.prompt_states): train loads no text encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pipeline.core.atomic import atomic_file
from pipeline.data.images import image_grid
from pipeline.diffusion.schedule import SAMPLE_GUIDANCE

BASE_COLUMN = "validation_base_column.png"  # in a checkpoint: the base images, one above the other
Judge = Callable[[list[list[Image.Image]], list[str]], dict[str, float]]  # (images per prompt, prompts) -> metrics


def embedded_prompt_arguments(arguments: dict, states: dict[str, torch.Tensor], empty: dict[str, torch.Tensor],
                              device) -> dict:
    """A sampler call's prompts replaced by their cached text states: each conditioning tensor goes in as the
    pipeline argument of its name, and the empty prompt's as its `negative_` one (the unconditional branch)."""
    embedded = {}
    for name, values in states.items():
        embedded[name] = values.to(device, torch.float32)
        embedded[f"negative_{name}"] = empty[name].to(device, torch.float32).expand_as(values)
    return {**{key: value for key, value in arguments.items() if key not in ("prompt", "negative_prompt")},
            **embedded}


@contextmanager
def adapters_disabled(denoiser: torch.nn.Module):
    """The denoiser as the pretrained model: its LoRA layers switched off for the block."""
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


@dataclass
class ValidationGrid:
    """The validation prompts' samples, with the base column and the metric they are scored by."""

    prompts: list[str]
    seeds: list[int]
    steps: int  # the sampler's
    cached_states: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None  # finetune: (prompts', empty's)
    judge: Judge | None
    base: list[list[Image.Image]] | None = None  # per prompt, one image per seed
    base_metrics: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def sample(self, pipeline, family, device) -> list[list[Image.Image]]:
        """Each prompt at each seed (one pipeline call per seed), as rows per prompt."""
        arguments = family.sampling_arguments(pipeline, self.prompts, SAMPLE_GUIDANCE)
        if self.cached_states is not None:
            arguments = embedded_prompt_arguments(arguments, *self.cached_states, device)
        columns = [pipeline(**arguments, num_inference_steps=self.steps,
                            generator=[torch.Generator().manual_seed(seed) for _ in self.prompts]).images
                   for seed in self.seeds]
        return [list(images) for images in zip(*columns, strict=True)]

    def score(self, rows: list[list[Image.Image]]) -> dict[str, float]:
        return self.judge(rows, self.prompts) if self.judge is not None else {}

    def render_base(self, pipeline, family, device, lora_denoiser: torch.nn.Module | None) -> None:
        """The base column, and its metrics: under LoRA with the adapters off, else the weights as they are now
        (call it before the first update)."""
        with adapters_disabled(lora_denoiser) if lora_denoiser is not None else nullcontext():
            self.base = self.sample(pipeline, family, device)
        self.base_metrics = self.score(self.base)

    def grid(self, current: list[list[Image.Image]]) -> Image.Image:
        """One row per (prompt, seed): the base model's image, then the current model's."""
        return image_grid([[base, now] for base_row, now_row in zip(self.base, current, strict=True)
                           for base, now in zip(base_row, now_row, strict=True)])

    def save_base(self, folder: Path) -> None:
        """The base column into a checkpoint folder, as one lossless strip."""
        tiles = [image for row in self.base for image in row]
        strip = Image.new("RGB", (tiles[0].width, tiles[0].height * len(tiles)))
        for position, tile in enumerate(tiles):
            strip.paste(tile, (0, position * tiles[0].height))
        with atomic_file(folder / BASE_COLUMN) as staging:
            strip.save(staging, format="PNG")

    def load_base(self, folder: Path) -> bool:
        """The base column a checkpoint holds; False where it holds none."""
        if not (folder / BASE_COLUMN).is_file():
            return False
        with Image.open(folder / BASE_COLUMN) as strip:
            strip = strip.convert("RGB")
        height = strip.height // (len(self.prompts) * len(self.seeds))
        tiles = [strip.crop((0, top, strip.width, top + height)) for top in range(0, strip.height, height)]
        self.base = [tiles[start : start + len(self.seeds)] for start in range(0, len(tiles), len(self.seeds))]
        return True
