"""Stage `evaluate`: deterministic metrics of models/sd on the validation set, and a sample grid.

- noise-prediction MSE, RMSE, MAE and R² on the cached validation latents at fixed timesteps with
  fixed noise (so two models are compared on exactly the same inputs), overall and per timestep;
- VAE reconstruction MSE, PSNR and SSIM on the validation images;
- prompt adherence for the synthetic source: every colour x shape prompt, several seeds each, read
  back by `pipeline.adherence`, as mean and std over `stability_repeats` seed sets;
- a determinism check: the same prompt and seed twice give identical pixels;
- reports/samples.png: one row per prompt, one column per seed.
All numbers go to metrics/eval.json and to the model's MLflow run.
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from pipeline.adherence import adheres
from pipeline.atomic import atomic_file, write_json
from pipeline.config import EvaluateParams, Params
from pipeline.contracts.data import load_split
from pipeline.contracts.latents import load_latents
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import EVAL_METRICS, UNAVAILABLE
from pipeline.diagnostics import image_grid, noise_metrics_on
from pipeline.external_metrics import ExternalMetrics, external_metrics
from pipeline.models import load_pipeline, reconstruct, to_model_range
from pipeline.shapes import COLOURS, SHAPES, caption_for
from pipeline.tracking import model_run

log = logging.getLogger(__name__)

SEED_SET_STRIDE = 1000  # seed sets of different repeats never overlap


def noise_prediction_metrics(pipeline: StableDiffusionPipeline, paths: Paths, params: EvaluateParams) -> dict:
    cache = load_latents(paths.latents, "val")
    return noise_metrics_on(pipeline, cache.single_size().mean.float(), cache.captions, params.timesteps, params.noise_seed)


def adherence_prompts() -> list[tuple[str, str]]:
    return list(itertools.product(COLOURS, SHAPES))


def generate_samples(
    pipeline: StableDiffusionPipeline, params: EvaluateParams, repeat: int = 0
) -> list[list[Image.Image]]:
    """One row of images per colour x shape prompt, one column per fixed seed (a new set per repeat)."""
    first_seed = params.sample_seed + repeat * SEED_SET_STRIDE
    rows = []
    for colour, shape in adherence_prompts():
        generators = [torch.Generator().manual_seed(first_seed + column) for column in range(params.samples_per_prompt)]
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


def stability_metrics(
    pipeline: StableDiffusionPipeline, params: EvaluateParams, external: ExternalMetrics
) -> tuple[dict, list]:
    """Every sample metric over `stability_repeats` seed sets as mean and std; returns the first set's images."""
    runs, first_rows = [], None
    prompts = [caption_for(colour, shape) for colour, shape in adherence_prompts()
               for _ in range(params.samples_per_prompt)]
    for repeat in range(params.stability_repeats):
        rows = generate_samples(pipeline, params, repeat)
        first_rows = first_rows or rows
        samples = adherence_metrics(rows)
        samples.pop("adherence_samples")
        runs.append(samples | external.score([image for row in rows for image in row], prompts))
    metrics = {}
    for name in runs[0]:
        values = np.array([run[name] for run in runs])
        metrics[name], metrics[f"{name}_std"] = float(values.mean()), float(values.std())
    metrics["adherence_samples"] = len(prompts) * params.stability_repeats
    return metrics, first_rows


def is_deterministic(pipeline: StableDiffusionPipeline, params: EvaluateParams) -> bool:
    """The same prompt and seed twice must give identical pixels."""
    images = [
        pipeline(caption_for("red", "circle"), num_inference_steps=params.num_inference_steps,
                 guidance_scale=params.guidance_scale,
                 generator=torch.Generator().manual_seed(params.sample_seed)).images[0]
        for _ in range(2)
    ]
    return images[0].tobytes() == images[1].tobytes()


def gaussian_ssim(first: torch.Tensor, second: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of NCHW images in [0, 1], with a Gaussian window."""
    coords = torch.arange(window, dtype=torch.float64) - window // 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d /= kernel_1d.sum()
    channels = first.shape[1]
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(channels, 1, window, window).to(first.dtype)

    def blur(x):
        return torch.nn.functional.conv2d(x, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu1, mu2 = blur(first), blur(second)
    var1, var2 = blur(first * first) - mu1**2, blur(second * second) - mu2**2
    covariance = blur(first * second) - mu1 * mu2
    ssim = ((2 * mu1 * mu2 + c1) * (2 * covariance + c2)) / ((mu1**2 + mu2**2 + c1) * (var1 + var2 + c2))
    return ssim.mean(dim=(1, 2, 3))


@torch.no_grad()
def vae_reconstruction_metrics(pipeline: StableDiffusionPipeline, paths: Paths) -> dict:
    model_input = to_model_range(load_split(paths, "val")[0])
    reconstructed = reconstruct(pipeline.vae, model_input)
    images, reconstructed = (model_input.double() + 1) / 2, (reconstructed.double() + 1) / 2
    mse = float(torch.mean((reconstructed - images) ** 2))
    return dict(
        vae_mse=mse,
        vae_psnr=10 * math.log10(1.0 / mse),
        vae_ssim=float(gaussian_ssim(reconstructed, images).mean()),
    )


def evaluate(params: Params, paths: Paths) -> dict:
    torch.manual_seed(params.evaluate.noise_seed)
    pipeline = load_pipeline(paths.sd_model)
    metrics = noise_prediction_metrics(pipeline, paths, params.evaluate)
    metrics.update(vae_reconstruction_metrics(pipeline, paths))
    external = external_metrics(params.evaluate, paths.root, load_split(paths, "val")[0])
    for name, reason in external.unavailable.items():
        log.warning("evaluate: %s unavailable: %s", name, reason)
    sample_metrics, rows = stability_metrics(pipeline, params.evaluate, external)
    metrics.update(sample_metrics)
    metrics["deterministic"] = float(is_deterministic(pipeline, params.evaluate))
    with atomic_file(paths.samples_grid) as staging:
        image_grid(rows).save(staging, format="PNG")
    write_json(paths.metrics / EVAL_METRICS, {**metrics, UNAVAILABLE: external.unavailable})
    with model_run(params, paths):
        import mlflow

        mlflow.log_metrics({f"eval_{name}": value for name, value in metrics.items()})
        mlflow.set_tags({f"eval_unavailable.{name}": reason for name, reason in external.unavailable.items()})
        mlflow.log_artifact(str(paths.samples_grid), artifact_path="evaluation")
    log.info("evaluate: adherence %.2f, noise MSE %.4f", metrics["adherence"], metrics["noise_mse"])
    return metrics
