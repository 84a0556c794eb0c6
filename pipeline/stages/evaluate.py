"""Stage `evaluate`: deterministic metrics of models/sd on the validation set, and a sample grid.

- noise-prediction MSE, RMSE, MAE and R² on the cached validation latents at fixed timesteps with
  fixed noise (so two models are compared on exactly the same inputs), overall and per timestep;
- VAE reconstruction MSE, PSNR and SSIM on the validation images;
- samples of the evaluation prompts (`pipeline.evaluation.prompts`: the user's file, the shapes, or the validation
  captions), several seeds each, judged by what applies to the data, as mean and std over
  `stability_repeats` seed sets: the colour-and-shape reader (`pipeline.evaluation.shape_adherence`) for the synthetic
  source, a label classifier fit on the real images (`pipeline.evaluation.label_adherence`) for labelled data sets;
- a determinism check: the same prompt and seed twice give identical pixels;
- reports/samples.png: one row per prompt, one column per seed.
A check that does not apply is listed under `unavailable` with the reason.
All numbers go to metrics/eval.json and to the model's MLflow run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from pipeline.contracts.data import MANIFEST, split_chunks
from pipeline.contracts.latents import load_latents
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import EVAL_METRICS, PROMPTS, UNAVAILABLE
from pipeline.core.atomic import atomic_file, write_json
from pipeline.core.config import EvaluateParams, Params
from pipeline.data.images import image_grid
from pipeline.data.shapes import SHAPE_PROMPTS
from pipeline.diffusion.families import family_of_pipeline, load_pipeline
from pipeline.diffusion.vae_io import reconstruct, to_model_range
from pipeline.evaluation.external_metrics import ExternalMetrics, external_metrics
from pipeline.evaluation.label_adherence import label_judge
from pipeline.evaluation.noise_metrics import noise_metrics_on
from pipeline.evaluation.prompts import evaluation_prompts
from pipeline.evaluation.shape_adherence import shape_adherence_metrics
from pipeline.tracking.runs import model_run

log = logging.getLogger(__name__)

SAMPLE_COUNT_SUFFIX = "_samples"
Judge = Callable[[list[list[Image.Image]], list[str]], dict]  # (rows of images, their prompts) -> metrics
SEED_SET_STRIDE = 1000  # seed sets of different repeats never overlap


def noise_prediction_metrics(pipeline: DiffusionPipeline, paths: Paths, params: EvaluateParams) -> dict:
    cache = load_latents(paths.latents, "val")
    return noise_metrics_on(pipeline, cache.single_size().mean, cache.captions, params.timesteps, params.noise_seed)


def generate_samples(
    pipeline: DiffusionPipeline, prompts: list[str], params: EvaluateParams, repeat: int = 0
) -> list[list[Image.Image]]:
    """One row of images per prompt, one column per fixed seed (a new set per repeat)."""
    first_seed = params.sample_seed + repeat * SEED_SET_STRIDE
    family, rows = family_of_pipeline(pipeline), []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(first_seed + column) for column in range(params.samples_per_prompt)]
        rows.append(
            pipeline(
                **family.sampling_arguments(pipeline, [prompt] * params.samples_per_prompt, params.guidance_scale),
                num_inference_steps=params.num_inference_steps,
                generator=generators,
            ).images
        )
    return rows


def sample_judges(params: Params, paths: Paths, prompts: list[str]) -> tuple[list[Judge], dict, dict[str, str]]:
    """The checks that apply to this data and these prompts, the metrics fixed by building them (the label
    classifier's accuracy on real images), and why each check that does not apply is left out."""
    source = params.ingest.source
    if source == "synthetic":
        unavailable = {"label_adherence": "the synthetic source is judged by its colour-and-shape reader (`adherence`)"}
        if not any(prompt in SHAPE_PROMPTS for prompt in prompts):
            return [], {}, unavailable | {"adherence": "no evaluation prompt is a colour-and-shape caption"}
        return [shape_adherence_metrics], {}, unavailable
    unavailable = {"adherence": f"the colour-and-shape reader applies to the synthetic source only "
                                f"(ingest.source: {source})"}
    judge, why_not = label_judge(paths, prompts, params.evaluate)
    if judge is None:
        return [], {}, unavailable | {"label_adherence": why_not}
    fixed = {"labels": len(judge.labels)}
    if judge.accuracy is None:
        unavailable["classifier_accuracy"] = "no validation image carries one of the labels"
    else:
        fixed["classifier_accuracy"] = judge.accuracy
    return [judge], fixed, unavailable


def stability_metrics(
    pipeline: DiffusionPipeline, prompts: list[str], judges: list[Judge], params: EvaluateParams,
    external: ExternalMetrics,
) -> tuple[dict, list]:
    """Every sample metric over `stability_repeats` seed sets as mean and std (sample counts are summed);
    returns the first set's images."""
    runs, first_rows = [], None
    prompt_per_image = [prompt for prompt in prompts for _ in range(params.samples_per_prompt)]
    for repeat in range(params.stability_repeats):
        rows = generate_samples(pipeline, prompts, params, repeat)
        first_rows = first_rows or rows
        run = external.score([image for row in rows for image in row], prompt_per_image)
        for judge in judges:
            run.update(judge(rows, prompts))
        runs.append(run)
    metrics = {}
    for name in runs[0]:
        values = np.array([run[name] for run in runs])
        if name.endswith(SAMPLE_COUNT_SUFFIX):
            metrics[name] = int(values.sum())
        else:
            metrics[name], metrics[f"{name}_std"] = float(values.mean()), float(values.std())
    return metrics, first_rows


def is_deterministic(pipeline: DiffusionPipeline, prompt: str, params: EvaluateParams) -> bool:
    """The same prompt and seed twice must give identical pixels."""
    arguments = family_of_pipeline(pipeline).sampling_arguments(pipeline, [prompt], params.guidance_scale)
    images = [
        pipeline(**arguments, num_inference_steps=params.num_inference_steps,
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
def vae_reconstruction_metrics(pipeline: DiffusionPipeline, chunks: Iterable[np.ndarray]) -> dict:
    """MSE and PSNR over the pixels (in [0, 1]) of uint8 NHWC chunks (`split_chunks`), and SSIM averaged
    over their images."""
    squared_error, pixels, ssim, images_seen = 0.0, 0, 0.0, 0
    for chunk in chunks:
        model_input = to_model_range(chunk)
        reconstructed = reconstruct(pipeline.vae, model_input)
        images, reconstructed = (model_input.double() + 1) / 2, (reconstructed.double() + 1) / 2
        squared_error += float(torch.sum((reconstructed - images) ** 2))
        pixels += images.numel()
        ssim += float(gaussian_ssim(reconstructed, images).sum())
        images_seen += len(images)
    mse = squared_error / pixels
    return dict(vae_mse=mse, vae_psnr=10 * math.log10(1.0 / mse), vae_ssim=ssim / images_seen)


def evaluate(params: Params, paths: Paths) -> dict:
    torch.manual_seed(params.evaluate.noise_seed)
    pipeline = load_pipeline(paths.sd_model)
    metrics = noise_prediction_metrics(pipeline, paths, params.evaluate)
    metrics.update(vae_reconstruction_metrics(pipeline, split_chunks(paths, "val")))
    external = external_metrics(params.evaluate, paths.root, split_chunks(paths, "val"))
    val_captions = pd.read_parquet(paths.processed / "val" / MANIFEST, columns=["caption"])["caption"]
    prompts = evaluation_prompts(params.evaluate, params.ingest.source, val_captions, paths.root)
    judges, judge_metrics, unavailable = sample_judges(params, paths, prompts)
    unavailable |= external.unavailable
    for name, reason in unavailable.items():
        log.warning("evaluate: %s unavailable: %s", name, reason)
    metrics.update(judge_metrics)
    sample_metrics, rows = stability_metrics(pipeline, prompts, judges, params.evaluate, external)
    metrics.update(sample_metrics)
    metrics["deterministic"] = float(is_deterministic(pipeline, prompts[0], params.evaluate))
    with atomic_file(paths.samples_grid) as staging:
        image_grid(rows).save(staging, format="PNG")
    write_json(paths.metrics / EVAL_METRICS, {**metrics, PROMPTS: prompts, UNAVAILABLE: unavailable})
    with model_run(params, paths):
        import mlflow

        mlflow.log_metrics({f"eval_{name}": value for name, value in metrics.items()})
        mlflow.set_tags({f"eval_unavailable.{name}": reason for name, reason in unavailable.items()})
        mlflow.log_text("\n".join(prompts) + "\n", "evaluation/prompts.txt")
        mlflow.log_artifact(str(paths.samples_grid), artifact_path="evaluation")
    log.info("evaluate: %s, noise MSE %.4f", ", ".join(
        f"{name} {metrics[name]:.2f}" for name in ("adherence", "label_adherence", "classifier_accuracy")
        if name in metrics) or "no sample check applies", metrics["noise_mse"])
    return metrics
