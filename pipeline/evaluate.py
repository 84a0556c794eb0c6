"""Stage `evaluate`: deterministic metrics of models/sd on the validation set, and a sample grid.

- noise-prediction MSE, RMSE, MAE and R² on the cached validation latents at fixed timesteps with
  fixed noise (so two models are compared on exactly the same inputs), overall and per timestep;
- prompt adherence for the synthetic source: every colour x shape prompt, several seeds each, read
  back by `pipeline.adherence`;
- reports/samples.png: one row per prompt, one column per seed.
All numbers go to metrics/eval.json and to the model's MLflow run.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from pipeline.adherence import adheres
from pipeline.atomic import atomic_file, write_json
from pipeline.config import EvaluateParams, Params, Paths
from pipeline.encode import load_latents
from pipeline.models import tokenize
from pipeline.sources.synthetic import COLOURS, SHAPES, caption_for
from pipeline.tracking import model_run

log = logging.getLogger(__name__)

METRICS = "eval.json"
GRID_ZOOM = 4


def load_pipeline(folder) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def noise_prediction_metrics(pipeline: StableDiffusionPipeline, paths: Paths, params: EvaluateParams) -> dict:
    cache = load_latents(paths.latents, "val")
    latents = cache.mean * pipeline.vae.config.scaling_factor
    states = pipeline.text_encoder(tokenize(pipeline.tokenizer, cache.captions))[0]
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)  # the forward process used in training
    metrics, predictions, targets = {}, [], []
    for timestep in params.timesteps:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(params.noise_seed + timestep))
        steps = torch.full((len(latents),), timestep, dtype=torch.long)
        prediction = pipeline.unet(scheduler.add_noise(latents, noise, steps), steps, states).sample
        metrics[f"noise_mse_t{timestep}"] = float(torch.mean((prediction - noise) ** 2))
        predictions.append(prediction.flatten())
        targets.append(noise.flatten())
    prediction, target = torch.cat(predictions), torch.cat(targets)
    error = prediction - target
    mse = float(torch.mean(error**2))
    metrics.update(
        noise_mse=mse,
        noise_rmse=mse**0.5,
        noise_mae=float(torch.mean(error.abs())),
        noise_r2=float(1 - torch.sum(error**2) / torch.sum((target - target.mean()) ** 2)),
    )
    return metrics


def adherence_prompts() -> list[tuple[str, str]]:
    return list(itertools.product(COLOURS, SHAPES))


def generate_samples(pipeline: StableDiffusionPipeline, params: EvaluateParams) -> list[list[Image.Image]]:
    """One row of images per colour x shape prompt, one column per fixed seed."""
    rows = []
    for colour, shape in adherence_prompts():
        generators = [
            torch.Generator().manual_seed(params.sample_seed + column) for column in range(params.samples_per_prompt)
        ]
        rows.append(
            pipeline(
                [caption_for(colour, shape)] * params.samples_per_prompt,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=generators,
            ).images
        )
    return rows


def adherence_metrics(rows: list[list[Image.Image]]) -> dict:
    hits = np.array([
        adheres(image, colour, shape)
        for (colour, shape), images in zip(adherence_prompts(), rows, strict=True)
        for image in images
    ])
    return dict(
        adherence=float(hits.all(axis=1).mean()),
        colour_accuracy=float(hits[:, 0].mean()),
        shape_accuracy=float(hits[:, 1].mean()),
        adherence_samples=len(hits),
    )


def image_grid(rows: list[list[Image.Image]], zoom: int = GRID_ZOOM) -> Image.Image:
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            grid.paste(image, (column * width, row * height))
    return grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST)


def evaluate(params: Params, paths: Paths) -> dict:
    torch.manual_seed(params.evaluate.noise_seed)
    pipeline = load_pipeline(paths.sd_model)
    metrics = noise_prediction_metrics(pipeline, paths, params.evaluate)
    rows = generate_samples(pipeline, params.evaluate)
    metrics.update(adherence_metrics(rows))
    with atomic_file(paths.samples_grid) as staging:
        image_grid(rows).save(staging, format="PNG")
    write_json(paths.metrics / METRICS, metrics)
    with model_run(params, paths):
        import mlflow

        mlflow.log_metrics({f"eval_{name}": value for name, value in metrics.items()})
        mlflow.log_artifact(str(paths.samples_grid), artifact_path="evaluation")
    log.info("evaluate: adherence %.2f, noise MSE %.4f", metrics["adherence"], metrics["noise_mse"])
    return metrics
