"""What the train stage hands on: models/sd as a standard diffusers folder with a model card, the LoRA
weights alone in LoRA mode."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from pipeline.contracts.paths import Paths
from pipeline.core.atomic import atomic_dir
from pipeline.core.config import FLOW_FAMILIES, ModelParams, TrainParams
from pipeline.diffusion.families.base import Family
from pipeline.tracking.lineage import data_version

MODEL_CARD = "README.md"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def save_model(family: Family, pipeline: DiffusionPipeline, lora_denoiser: torch.nn.Module | None,
               model: ModelParams, paths: Paths, card: str) -> None:
    """models/sd: the whole pipeline (LoRA fused into the denoiser) and, in LoRA mode (`lora_denoiser`, the
    trained denoiser with its LoRA layers), the LoRA weights alone."""
    with atomic_dir(paths.sd_model) as staging:
        if lora_denoiser is not None:
            family.save_lora(staging, lora_denoiser)
            pipeline = base_pipeline_with_lora(family, pipeline, model.pretrained, paths, staging)
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / MODEL_CARD).write_text(card, encoding="utf-8")


def base_pipeline_with_lora(family: Family, trained: DiffusionPipeline, pretrained: str, paths: Paths,
                            lora_folder: Path) -> DiffusionPipeline:
    """The pretrained denoiser with the saved LoRA file loaded the way users load it, then fused into its weights."""
    denoiser = family.load_denoiser(pretrained, paths.root)
    denoiser.register_to_config(sample_size=getattr(trained, family.denoiser).config.sample_size)
    pipeline = family.pipeline({**trained.components, family.denoiser: denoiser})
    pipeline.load_lora_weights(lora_folder, weight_name=LORA_WEIGHTS)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    return pipeline


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
        "pipe.load_lora_weights(\"models/sd\")\n```\n\n"
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


def objective_line(model: ModelParams, train: TrainParams) -> str:
    if model.family not in FLOW_FAMILIES:
        return f"prediction type: {train.prediction_type}"
    flow = train.flow
    shift = flow.shift if flow.shift is not None else "the default (the family's, or the pretrained scheduler's)"
    return f"objective: flow matching (velocity), σ {flow.sampling}, shift {shift}, loss weighting {flow.weighting}"
