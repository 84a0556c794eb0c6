"""The model families `model.family` chooses from, one module each (base.py says what a family declares).

A saved pipeline folder names its family by its pipeline class (model_index.json), so evaluate, generate
and the served model find the family of any folder without a parameter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from diffusers import DiffusionPipeline

from pipeline.core.config import ConfigError, TrainParams, VaeParams, latent_channels_of
from pipeline.diffusion.components import PIPELINE_INDEX, build_vae, pretrained_location
from pipeline.diffusion.families import chroma, flux, sd, sd3, sdxl, zimage
from pipeline.diffusion.families.base import Family, Scratch
from pipeline.runtime.device import compute_device

FAMILIES: dict[str, Family] = {module.FAMILY.name: module.FAMILY for module in (sd, sdxl, sd3, flux, chroma, zimage)}
# the random stand-ins' VAE shift and scale for the families whose latents are shifted: like the released ones
# (Flux.1's), nonzero and not 1
STAND_IN_LATENT_SHIFT, STAND_IN_LATENT_SCALE = 0.1159, 0.3611


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"model.family: {name!r} is not a model family; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_pipeline(pipeline: DiffusionPipeline) -> Family:
    return family_of_class(type(pipeline).__name__, f"the pipeline {type(pipeline).__name__}")


def family_of_class(class_name: str, where: str) -> Family:
    for family in FAMILIES.values():
        if family.pipeline_class.__name__ == class_name:
            return family
    raise ValueError(f"{where}: pipeline class {class_name} belongs to no family sdpipe trains "
                     f"({', '.join(f.pipeline_class.__name__ for f in FAMILIES.values())})")


def family_of_folder(folder: str | Path) -> Family:
    """The family whose pipeline class a saved diffusers folder names."""
    index = Path(folder) / PIPELINE_INDEX
    try:
        class_name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{index}: not a readable diffusers pipeline index ({error})") from None
    return family_of_class(class_name, str(index))


def check_pretrained_family(spec: str, root: Path, family: Family) -> None:
    """`model.pretrained` must be a pipeline of `model.family`."""
    location = pretrained_location(spec, root)
    try:
        class_name = DiffusionPipeline.load_config(location)["_class_name"]
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"model.pretrained: cannot read the pipeline index of {spec!r} ({error})") from None
    if class_name != family.pipeline_class.__name__:
        raise ConfigError(f"model.family: {family.name} trains a {family.pipeline_class.__name__}, but model.pretrained "
                          f"{spec!r} is a {class_name}: set model.family to its family")


def random_pipeline(family: Family, captions: Iterable[str], *, preset: str = "tiny", vae: VaeParams = VaeParams(),
                    resolution: int = 32, vocab_size: int = 1000, max_sequence_length: int = 77) -> DiffusionPipeline:
    """A randomly initialised pipeline of a family at a preset. Saved with save_pretrained it has the files and
    layout of real weights (SD 1.5, SDXL, SD 3.5, Flux.1 ...; the flow families' VAE with a latent shift): the
    stand-in for them in tests and benchmarks."""
    autoencoder = build_vae(vae, resolution, latent_channels_of(vae, family.name))
    if family.declared.latents_shifted:
        autoencoder.register_to_config(shift_factor=STAND_IN_LATENT_SHIFT, scaling_factor=STAND_IN_LATENT_SCALE)
    latent_size = resolution // 2 ** (len(vae.block_out_channels) - 1)
    components = family.scratch_components(Scratch(tuple(captions), preset, vocab_size, autoencoder.config.latent_channels,
                                                   latent_size, max_sequence_length))
    objective = family.training_objective(TrainParams(), None)
    return family.pipeline({**components, "vae": autoencoder, "scheduler": objective.sampling_scheduler()})


def load_pipeline(folder) -> DiffusionPipeline:
    """A saved pipeline of any family on the compute device (sampling stays deterministic: seeds drive CPU
    generators)."""
    pipeline = family_of_folder(folder).pipeline_class.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(compute_device())
