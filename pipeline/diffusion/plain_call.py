"""The call that samples a saved model in plain diffusers exactly as sdpipe's sampler does (`sdpipe generate`,
evaluate, the served model): its pipeline class, and every argument of sdpipe's call whose value differs from
what the pipeline defaults to. The model card shows it as code (training/export.py); the registry version's
description and `sdpipe models` repeat the card's block (contracts.records.call_in_card).

What a saved folder can carry it carries: its sampler (scheduler/), T5's trained length (its tokenizer's
model_max_length, which sdpipe's sampler reads) and the trained size (the denoiser's sample_size, which every
pipeline but Flux's defaults to). What remains are defaults fixed in a pipeline's code: steps, guidance, T5's
padded length, Flux's 1024 px.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from accelerate import init_empty_weights
from diffusers import DiffusionPipeline

from pipeline.diffusion.families import family_of_folder, family_of_pipeline

SAMPLE_IMAGE = "sample.png"


@dataclass(frozen=True)
class Sample:
    """What to draw: one prompt and seed, at the steps and guidance sdpipe's evaluation samples with."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    negative_prompt: str | None = None


def sampler_call(pipeline: DiffusionPipeline, sample: Sample) -> dict:
    """The arguments sdpipe's sampler passes for one image, prompt first (the generator aside)."""
    family = family_of_pipeline(pipeline)
    arguments = family.sampling_arguments(pipeline, [sample.prompt], sample.guidance, sample.negative_prompt)
    single = {name: value[0] if isinstance(value, list) else value for name, value in arguments.items()}
    return {**single, "num_inference_steps": sample.steps}


def pipeline_defaults(pipeline: DiffusionPipeline) -> dict:
    """What the pipeline's call uses for each argument left out: its signature's defaults, and the size it
    computes when none is given."""
    signature = inspect.signature(type(pipeline).__call__)
    defaults = {name: parameter.default for name, parameter in signature.parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    return {**defaults, **family_of_pipeline(pipeline).default_size(pipeline)}


def pipeline_skeleton(folder: str | Path) -> DiffusionPipeline:
    """The pipeline a saved folder loads as, with its configs, tokenizers and scheduler but no weights (denoiser
    and VAE on the meta device, no text encoders): what its call defaults to, read in seconds at any size."""
    family = family_of_folder(folder)
    empty = {}
    with init_empty_weights():
        for name, model_class in ((family.denoiser, family.denoiser_class), ("vae", family.latent_space.vae_class)):
            empty[name] = model_class.from_config(model_class.load_config(folder, subfolder=name))
    return family.pipeline_class.from_pretrained(folder, **empty, **{part.encoder: None for part in family.text})


@dataclass(frozen=True)
class PlainCall:
    """The plain-diffusers call of a model: `arguments` beyond the prompt, each with the pipeline's default."""

    pipeline_class: str
    location: str  # what from_pretrained reads
    sample: Sample
    arguments: dict
    defaults: dict
    lora: str | None = None  # the folder whose LoRA file load_lora_weights loads onto the base at `location`
    scheduler: str | None = None  # the sampler's class, loaded from `lora`'s folder when the base's differs

    def code(self, image: str = SAMPLE_IMAGE) -> str:
        classes = sorted({self.pipeline_class, *([self.scheduler] if self.scheduler else [])})
        lines = ["import torch", f"from diffusers import {', '.join(classes)}", "",
                 f"pipe = {self.pipeline_class}.from_pretrained({self.location!r})"]
        if self.lora:
            lines.append(f"pipe.load_lora_weights({self.lora!r})")
        if self.scheduler:
            lines.append(f"pipe.scheduler = {self.scheduler}.from_pretrained({self.lora!r}, subfolder=\"scheduler\")")
        # by keyword: Flux2KleinPipeline's first positional argument is an image
        lines += ["image = pipe(", f"    prompt={self.sample.prompt!r},"]
        lines += [f"    {name}={value!r}," for name, value in self.arguments.items()]
        lines += [f"    generator=torch.Generator().manual_seed({self.sample.seed}),", ").images[0]",
                  f"image.save({image!r})"]
        return "\n".join(lines) + "\n"


def plain_call(model: DiffusionPipeline, location: str, sample: Sample, *,
               base: DiffusionPipeline | None = None, base_location: str | None = None) -> PlainCall:
    """The call of `model` (a pipeline or its skeleton, saved at `location`); with `base`, the same model as its
    LoRA file on the base pipeline saved at `base_location`: the base's defaults decide what the call names, and
    the model's sampler replaces the base's where they differ."""
    called = base if base is not None else model
    defaults = pipeline_defaults(called)
    arguments = {name: value for name, value in sampler_call(model, sample).items()
                 if name != "prompt" and (name not in defaults or defaults[name] != value)}
    if base is None:
        return PlainCall(type(model).__name__, location, sample, arguments,
                         {name: defaults.get(name) for name in arguments})
    same_sampler = type(base.scheduler) is type(model.scheduler) and public(base.scheduler.config) == public(
        model.scheduler.config)
    return PlainCall(type(base).__name__, base_location, sample, arguments,
                     {name: defaults.get(name) for name in arguments}, lora=location,
                     scheduler=None if same_sampler else type(model.scheduler).__name__)


def public(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}

