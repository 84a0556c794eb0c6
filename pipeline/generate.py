"""`sdpipe generate`: images from a trained model, a local diffusers folder or a registry URI.

    sdpipe generate --model models/sd --prompt "a red circle" -n 8 --seed 0 --out samples/
    sdpipe generate --model models:/sdpipe@champion --prompt "a blue square"
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.contracts.paths import Paths
from pipeline.core.atomic import atomic_file
from pipeline.core.config import Params
from pipeline.data.images import image_grid
from pipeline.diffusion.families import family_of_pipeline, load_pipeline
from pipeline.diffusion.schedule import use_scheduler
from pipeline.tracking.model_source import resolve_model

log = logging.getLogger(__name__)

def generate(
    params: Params, paths: Paths, *, model: str, prompt: str, count: int = 4, seed: int = 0, out: Path,
    steps: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
    scheduler: str | None = None, batch_size: int = 8,
) -> list[Path]:
    """`scheduler`: a sampler by name (schedule.SCHEDULERS); None: dpm++ for the DDPM families, the flow
    families' own Euler sampler."""
    # None means "as evaluate samples"; 0 guidance (no classifier-free guidance) is a choice, not a default
    guidance = params.evaluate.guidance_scale if guidance is None else guidance
    steps = params.evaluate.num_inference_steps if steps is None else steps
    pipeline = load_pipeline(resolve_model(model, params.register_, paths))
    family = family_of_pipeline(pipeline)
    use_scheduler(pipeline, scheduler)
    images = []
    for first in range(0, count, batch_size):
        size = min(batch_size, count - first)
        images += pipeline(
            **family.sampling_arguments(pipeline, [prompt] * size, guidance, negative_prompt),
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(seed + first + index) for index in range(size)],
        ).images
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, image in enumerate(images):
        target = out / f"{index:03d}_seed{seed + index}.png"
        with atomic_file(target) as staging:
            image.save(staging, format="PNG")
        written.append(target)
    with atomic_file(out / "grid.png") as staging:
        image_grid([images]).save(staging, format="PNG")
    log.info("generate: %d images for %r in %s", count, prompt, out)
    return written
