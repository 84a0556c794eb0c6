"""What the train stage hands on: models/sd as a standard diffusers folder with a model card, the LoRA
weights alone in LoRA mode."""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.contracts.paths import Paths
from pipeline.contracts.records import CALL_HEADING, MODEL_CARD
from pipeline.core.atomic import atomic_dir
from pipeline.core.config import ModelParams, TrainParams
from pipeline.diffusion.components import PIPELINE_INDEX, component_folder, pretrained_folder, stored_dtype
from pipeline.diffusion.families.base import Family
from pipeline.diffusion.plain_call import PlainCall, Sample, pipeline_skeleton, plain_call
from pipeline.diffusion.schedule import SAMPLE_GUIDANCE, SAMPLE_STEPS
from pipeline.training.lora_formats import KOHYA_LORA_WEIGHTS, save_kohya_lora
from pipeline.training.modules import lora_config
from pipeline.tracking.lineage import data_version

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def save_model(family: Family, trained: dict[str, object], model: ModelParams, paths: Paths,
               card: Callable[[Path], str], *, lora_layers: dict[str, torch.Tensor] | None = None,
               sample_size: int | None = None) -> None:
    """models/sd: the family's pipeline of the trained components (`trained`: the denoiser, scratch mode's
    tokenizers and text encoders, the sampling scheduler) beside the frozen ones' files, copied as they are:
    the VAE of models/vae and, in finetune mode, the pretrained tokenizers and text encoders. In LoRA mode
    (`lora_layers`, from Family.lora_layers) the denoiser is the pretrained one with the layers fused in, and the
    layers are saved alone too. `card` writes the model card of the saved folder."""
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
        record_trained_sequence_length(family, model, staging)
        (staging / MODEL_CARD).write_text(card(staging), encoding="utf-8")


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


def record_trained_sequence_length(family: Family, model: ModelParams, folder: Path) -> None:
    """A fine-tune's T5 tokenizer is the base's files, with the length training read (model.max_sequence_length)
    as its model_max_length, as a scratch model's is saved: sdpipe's samplers and the model card read it there."""
    if model.mode != "finetune":
        return
    for part in family.text:
        if part.sequence_length_is_a_param:
            config_file = folder / part.tokenizer / "tokenizer_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["model_max_length"] = model.max_sequence_length
            config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


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


def model_card(folder: Path, family: Family, model: ModelParams, train: TrainParams, paths: Paths, metrics: dict,
               prompt: str) -> str:
    """README.md of models/sd (saved at `folder`): how to sample it in plain diffusers, how it was made, on what
    data, and how well it trained."""
    settings = json.dumps({"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json")},
                          indent=2)
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in metrics.items())
    if model.mode == "scratch":
        title = f"# sdpipe {family.name} model trained from scratch ({model.preset} preset)\n\n"
    else:
        title = f"# sdpipe {model.finetune} fine-tune of `{model.pretrained}`\n\n"
    return (
        "---\nlibrary_name: diffusers\ntags: [text-to-image, stable-diffusion, sdpipe]\n---\n\n" + title +
        f"A latent diffusion pipeline of the `{family.name}` family ({family.pipeline_class.__name__}) trained by "
        "sdpipe.\n\n" + usage(folder, family, model, paths, prompt) +
        f"## How it was made\n\n- data: DVC version of data/processed `{data_version(paths.root)}`, "
        f"{metrics.get('train_samples', 0):.0f} training samples\n"
        f"- {family.objective_line(train)}\n\n"
        f"## Training metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        "Evaluation metrics are in metrics/eval.json and on the MLflow model version.\n\n"
        f"## Parameters\n\n```json\n{settings}\n```\n"
    )


def usage(folder: Path, family: Family, model: ModelParams, paths: Paths, prompt: str) -> str:
    """The card's plain-diffusers section: the call that draws what sdpipe draws (at sdpipe's sampling defaults,
    seed 0), why it names each argument, and in LoRA mode the same on the base model."""
    location = paths.sd_model.relative_to(paths.root).as_posix()
    sample = Sample(prompt, 0, SAMPLE_STEPS, SAMPLE_GUIDANCE)
    skeleton = pipeline_skeleton(folder)
    call = plain_call(skeleton, location, sample)
    size_is_read = family.default_size(skeleton) == family.trained_size(skeleton)
    text = (
        f"{CALL_HEADING}\n\nNo sdpipe code is needed: run from the project's root, this draws what "
        f"`sdpipe generate --prompt {shlex.quote(prompt)} --seed {sample.seed} --steps {sample.steps} --guidance "
        f"{sample.guidance} -n 1` draws (steps and guidance: the defaults of `evaluate.num_inference_steps` and "
        "`evaluate.guidance_scale`; on the CPU, where the card runs: sdpipe samples on the GPU where there is one, "
        "with the same CPU-seeded noise).\n\n"
        f"```python\n{call.code()}```\n\n"
        f"The folder carries its sampler (`scheduler/`: {type(skeleton.scheduler).__name__} with the noise schedule "
        f"it was trained on) and the size it was trained at (the {family.denoiser}'s `sample_size`, which "
        f"{call.pipeline_class} {'reads' if size_is_read else 'does not read'}). The arguments remain because "
        f"{call.pipeline_class} fixes their defaults in its code:\n\n{reasons(call, family)}\n\n"
    )
    if model.mode != "finetune" or model.finetune != "lora":
        return text
    base_location = model.pretrained
    on_base = plain_call(skeleton, location, sample, base=pipeline_skeleton(pretrained_folder(base_location, paths.root)),
                         base_location=base_location)
    return text + (
        f"### The LoRA file on the base model\n\nThe LoRA layers alone are in `{LORA_WEIGHTS}` (rank "
        f"{model.lora.rank}, alpha {model.lora.alpha}); the {family.denoiser} in this folder has them fused in. On "
        "the base model (the same images, up to the rounding of fused against separate LoRA weights):\n\n"
        f"```python\n{on_base.code('sample_lora.png')}```\n\n{reasons(on_base, family)}\n"
        + ("- `pipe.scheduler`: the sampler this model was trained for; the base's differs\n"
           if on_base.scheduler else "") + "\n" + kohya_line(model)
    )


def reasons(call: PlainCall, family: Family) -> str:
    return "\n".join(f"- `{name}={value!r}` (default {call.defaults[name]!r}): {family.argument_reasons.get(name, '')}"
                     for name, value in call.arguments.items())


def kohya_line(model: ModelParams) -> str:
    if "kohya" not in model.lora.export:
        return ""
    return (f"The same layers in kohya's key layout, for ComfyUI and AUTOMATIC1111, are in `{KOHYA_LORA_WEIGHTS}` "
            "(diffusers reads it too: `pipe.load_lora_weights(\"models/sd\", "
            f"weight_name=\"{KOHYA_LORA_WEIGHTS}\")`).\n\n")

