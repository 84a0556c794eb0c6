"""Stage `class_images`: the class images of the image prior (`train.prior.kind: images`), rendered by the
pretrained model (`model.pretrained`) from `train.prior.class_prompt`, into data/class_images/, where ingest reads
them as the class subset (`ingest.subsets.<class_subset>: {source: folder, folder: {path: data/class_images}}`).

Image i is rendered alone from seed `train.prior.seed + i` at the base's own size, with its prompt as its sidecar
caption (`<name>.txt`), and named by a hash of everything its pixels depend on: the base model's files, the prompt,
the seed, the sampler steps and the guidance. data/class_images persists between runs (dvc.yaml), so a re-run
renders nothing, one more image renders one, and a new prompt or base renders them all; the images no setting
names any more are deleted. class_images.json lists the images and their seeds. With another prior kind the folder
holds only that record and nothing is loaded.

    sdpipe class_images
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from pipeline.contracts.paths import Paths
from pipeline.core.atomic import atomic_file, write_json
from pipeline.core.config import ModelParams, TrainParams
from pipeline.core.hashing import folder_hash
from pipeline.core.prior_params import IMAGE_PRIOR, PriorParams

log = logging.getLogger(__name__)

IMAGE_SUFFIX, CAPTION_SUFFIX = ".png", ".txt"
RECORD = "class_images.json"  # what the folder holds: the prompt and each image's seed (ingest reads only images)


def class_image_name(base: str, prior: PriorParams, seed: int) -> str:
    """The file name of the class image from `seed`: its seed, then a hash of what its pixels depend on."""
    recipe = "\n".join(map(str, (base, prior.class_prompt, seed, prior.num_inference_steps, prior.guidance_scale)))
    return f"{seed:08d}-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}{IMAGE_SUFFIX}"


def wanted_images(prior: PriorParams, model: ModelParams, paths: Paths) -> dict[str, int]:
    """The images the settings name, by file name, with their seeds; none unless the prior is the image prior."""
    if prior.kind != IMAGE_PRIOR:
        return {}
    from pipeline.diffusion.components import pretrained_folder

    base = folder_hash(pretrained_folder(model.pretrained, paths.root))
    seeds = range(prior.seed, prior.seed + prior.num_class_images)
    return {class_image_name(base, prior, seed): seed for seed in seeds}


def remove_unwanted(folder: Path, wanted: dict[str, int]) -> int:
    """Delete the images (and captions) of earlier settings; returns how many images went."""
    removed = 0
    for path in sorted(folder.iterdir()):
        if path.name != RECORD and path.with_suffix(IMAGE_SUFFIX).name not in wanted:
            removed += path.suffix == IMAGE_SUFFIX
            path.unlink()
    return removed


def render(missing: dict[str, int], prior: PriorParams, model: ModelParams, folder: Path, paths: Paths) -> None:
    """Each missing image from its own seed, one pipeline call each (so an image never depends on which others
    are rendered with it); its caption first, so an image is never there without it."""
    # here, not at the top: with another prior kind the stage runs in every `dvc repro` and loads no model
    import torch

    from pipeline.diffusion.components import pretrained_folder
    from pipeline.diffusion.families import family_of_pipeline, load_pipeline

    with torch.no_grad():
        pipeline = load_pipeline(pretrained_folder(model.pretrained, paths.root))
        family = family_of_pipeline(pipeline)
        for name, seed in missing.items():
            image = pipeline(**family.sampling_arguments(pipeline, [prior.class_prompt], prior.guidance_scale),
                             num_inference_steps=prior.num_inference_steps,
                             generator=torch.Generator().manual_seed(seed)).images[0]
            with atomic_file(folder / Path(name).with_suffix(CAPTION_SUFFIX)) as staging:
                Path(staging).write_text(prior.class_prompt + "\n", encoding="utf-8")
            with atomic_file(folder / name) as staging:
                image.save(staging, format="PNG")


def class_images(paths: Paths, *, train: TrainParams, model: ModelParams) -> dict[str, int]:
    """Returns how many class images were rendered, kept from the last run and removed."""
    prior, folder = train.prior, paths.class_images
    folder.mkdir(parents=True, exist_ok=True)
    wanted = wanted_images(prior, model, paths)
    removed = remove_unwanted(folder, wanted)
    missing = {name: seed for name, seed in wanted.items() if not (folder / name).is_file()}
    if missing:
        render(missing, prior, model, folder, paths)
    counts = {"rendered": len(missing), "kept": len(wanted) - len(missing), "removed": removed}
    write_json(folder / RECORD, {"class_prompt": prior.class_prompt if wanted else None, "images": wanted})
    log.info("class_images: %d rendered, %d kept from the last run, %d removed", *counts.values())
    return counts
