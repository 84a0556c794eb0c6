"""What the train stage hands on: models/sd as a standard diffusers folder with a model card, the LoRA
weights alone in LoRA mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pipeline.contracts.paths import Paths
from pipeline.core.atomic import atomic_dir
from pipeline.core.config import FLOW_FAMILIES, ModelParams, TrainParams
from pipeline.diffusion.components import PIPELINE_INDEX, component_folder, pretrained_folder, stored_dtype
from pipeline.diffusion.families.base import Family
from pipeline.training.lora_formats import KOHYA_LORA_WEIGHTS, save_kohya_lora
from pipeline.training.modules import lora_config
from pipeline.tracking.lineage import data_version

MODEL_CARD = "README.md"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def save_model(family: Family, trained: dict[str, object], model: ModelParams, paths: Paths, card: str, *,
               lora_layers: dict[str, torch.Tensor] | None = None, sample_size: int | None = None) -> None:
    """models/sd: the family's pipeline of the trained components (`trained`: the denoiser, scratch mode's
    tokenizers and text encoders, the sampling scheduler) beside the frozen ones' files, copied as they are:
    the VAE of models/vae and, in finetune mode, the pretrained tokenizers and text encoders. In LoRA mode
    (`lora_layers`, from Family.lora_layers) the denoiser is the pretrained one with the layers fused in, and the
    layers are saved alone too."""
    frozen = frozen_components(family, model, paths)
    with atomic_dir(paths.sd_model) as staging:
        components = {**trained, **dict.fromkeys(frozen)}
        if lora_layers is not None:
            family.save_lora(staging, lora_layers, lora_config(family, model.lora).to_dict())
            if "kohya" in model.lora.export:
                save_kohya_lora(staging, family, lora_layers, model.lora)
            components[family.denoiser] = base_denoiser_with_lora(family, components, model.pretrained, paths, staging,
                                                                  sample_size)
        family.pipeline(components).save_pretrained(staging, safe_serialization=True)
        copy_components(frozen, staging)
        (staging / MODEL_CARD).write_text(card, encoding="utf-8")


def frozen_components(family: Family, model: ModelParams, paths: Paths) -> dict[str, tuple[Path, list]]:
    """The components saved as the files they were loaded from: {name: (folder, its model_index.json entry)}."""
    vae_class = json.loads((paths.vae_model / "config.json").read_text(encoding="utf-8"))["_class_name"]
    frozen = {"vae": (paths.vae_model, ["diffusers", vae_class])}
    if model.mode == "finetune":
        index = json.loads((pretrained_folder(model.pretrained, paths.root) / PIPELINE_INDEX).read_text(encoding="utf-8"))
        for part in family.text:
            for name in (part.tokenizer, part.encoder):
                frozen[name] = (component_folder(model.pretrained, paths.root, name), index[name])
    return frozen


def copy_components(frozen: dict[str, tuple[Path, list]], folder: Path) -> None:
    """Each frozen component's files into the saved pipeline (a hub cache's links followed), named in its index."""
    for name, (source, _) in frozen.items():
        shutil.copytree(source, folder / name)
    index_file = folder / PIPELINE_INDEX
    index = json.loads(index_file.read_text(encoding="utf-8"))
    index.update({name: entry for name, (_, entry) in frozen.items()})
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def base_denoiser_with_lora(family: Family, components: dict, pretrained: str, paths: Paths, lora_folder: Path,
                            sample_size: int | None) -> torch.nn.Module:
    """The pretrained denoiser, in the dtype it is stored in, with the saved LoRA file loaded the way users load
    it, then fused into its weights."""
    stored = stored_dtype(component_folder(pretrained, paths.root, family.denoiser))
    denoiser = family.load_denoiser(pretrained, paths.root, dtype=stored)
    denoiser.register_to_config(sample_size=sample_size)
    pipeline = family.pipeline({**components, family.denoiser: denoiser})
    pipeline.load_lora_weights(lora_folder, weight_name=LORA_WEIGHTS)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    return getattr(pipeline, family.denoiser)


def model_card(family: Family, model: ModelParams, train: TrainParams, paths: Paths, metrics: dict) -> str:
    """README.md of models/sd: how it was made, on what data, and how well it trained."""
    pipeline_class = family.pipeline_class.__name__
    settings = json.dumps({"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json")},
                          indent=2)
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in metrics.items())
    if model.mode == "scratch":
        title = f"# sdpipe {family.name} model trained from scratch ({model.preset} preset)\n\n"
    else:
        title = f"# sdpipe {model.finetune} fine-tune of `{model.pretrained}`\n\n"
    lora = (
        f"The LoRA layers alone are in `{LORA_WEIGHTS}` (rank {model.lora.rank}, alpha "
        f"{model.lora.alpha}); the {family.denoiser} in this folder has them fused in. On the base model:\n\n"
        f"```python\npipe = {pipeline_class}.from_pretrained(\"{model.pretrained}\")\n"
        "pipe.load_lora_weights(\"models/sd\")\n```\n\n" + kohya_line(model)
    ) if model.mode == "finetune" and model.finetune == "lora" else ""
    return (
        "---\nlibrary_name: diffusers\ntags: [text-to-image, stable-diffusion, sdpipe]\n---\n\n" + title +
        f"A latent diffusion pipeline of the `{family.name}` family ({pipeline_class}) trained by sdpipe.\n\n"
        f"```python\nfrom diffusers import {pipeline_class}\n"
        f"pipe = {pipeline_class}.from_pretrained(\"models/sd\")\n```\n\n" + lora +
        f"- data: DVC version of data/processed `{data_version(paths.root)}`, "
        f"{metrics.get('train_samples', 0):.0f} training samples\n"
        f"- {objective_line(model, train)}\n\n"
        f"## Training metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        "Evaluation metrics are in metrics/eval.json and on the MLflow model version.\n\n"
        f"## Parameters\n\n```json\n{settings}\n```\n"
    )


def kohya_line(model: ModelParams) -> str:
    if "kohya" not in model.lora.export:
        return ""
    return (f"The same layers in kohya's key layout, for ComfyUI and AUTOMATIC1111, are in `{KOHYA_LORA_WEIGHTS}` "
            "(diffusers reads it too: `pipe.load_lora_weights(\"models/sd\", "
            f"weight_name=\"{KOHYA_LORA_WEIGHTS}\")`).\n\n")


def objective_line(model: ModelParams, train: TrainParams) -> str:
    if model.family not in FLOW_FAMILIES:
        return f"prediction type: {train.prediction_type}"
    flow = train.flow
    shift = flow.shift if flow.shift is not None else "the default (the family's, or the pretrained scheduler's)"
    return f"objective: flow matching (velocity), σ {flow.sampling}, shift {shift}, loss weighting {flow.weighting}"
