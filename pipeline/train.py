"""Stage `train`: a text-conditioned UNet and a CLIP text encoder trained on cached latents.

Reads data/latents and models/vae; builds a tokenizer from the training captions; trains with
accelerate (the same code on a CPU or GPUs); writes models/sd as a standard diffusers folder,
metrics/train.json, the loss curve metrics/train_loss.csv (a DVC plot) and the MLflow run id.

    sdpipe train                                   # one process, as `dvc repro` runs it
    accelerate launch -m pipeline.cli train        # several processes / GPUs
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from pipeline.atomic import atomic_dir, atomic_file, write_json
from pipeline.config import Params, Paths, TrainParams
from pipeline.encode import CachedLatents, load_latents
from pipeline.models import (
    PRESETS,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    sampling_scheduler,
    tokenize,
    training_scheduler,
)
from pipeline.tracking import training_run

log = logging.getLogger(__name__)

METRICS = "train.json"
LOSS_PLOT = "train_loss.csv"


@dataclass
class Batch:
    latents: torch.Tensor
    caption_ids: torch.Tensor


def shuffled_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices: every sample once per epoch, in a fresh order each epoch."""
    batch_size = min(batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def drop_captions(ids: torch.Tensor, empty_ids: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Replace a share of captions with the empty prompt: the unconditional branch of guidance."""
    dropped = torch.rand(len(ids), generator=generator) < rate
    return torch.where(dropped[:, None], empty_ids.expand_as(ids), ids)


def batch_stream(
    cache: CachedLatents, caption_ids: torch.Tensor, empty_ids: torch.Tensor, *, scale: float,
    settings: TrainParams, generator: torch.Generator,
) -> Iterator[Batch]:
    """Latents sampled from the cached posterior (scaled to unit variance), captions with dropout."""
    for index in shuffled_batches(len(cache), settings.batch_size, generator):
        noise = torch.randn(cache.mean[index].shape, generator=generator)
        latents = (cache.mean[index] + cache.std[index] * noise) * scale
        ids = drop_captions(caption_ids[index], empty_ids, settings.caption_dropout, generator)
        yield Batch(latents, ids)


def diffusion_loss(unet, text_encoder, scheduler: DDPMScheduler, batch: Batch, generator: torch.Generator, device):
    latents = batch.latents.to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(device)
    states = text_encoder(batch.caption_ids.to(device))[0]
    prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, states).sample
    return F.mse_loss(prediction.float(), noise)


def fit(
    accelerator: Accelerator, unet, text_encoder, batches: Iterator[Batch], settings: TrainParams,
    generator: torch.Generator, log_metrics: Callable[[dict, int], None],
) -> list[tuple[int, float]]:
    """The optimisation loop; returns the loss curve as (step, mean loss since the last point)."""
    scheduler = training_scheduler()
    optimizer = torch.optim.AdamW(
        list(unet.parameters()) + list(text_encoder.parameters()),
        lr=settings.learning_rate, weight_decay=settings.weight_decay,
    )
    lr_schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps
    )
    unet, text_encoder, optimizer, lr_schedule = accelerator.prepare(unet, text_encoder, optimizer, lr_schedule)
    curve, window, started = [], [], time.perf_counter()
    progress = tqdm(range(1, settings.steps + 1), desc="train", disable=not accelerator.is_local_main_process)
    for step in progress:
        with accelerator.autocast():
            loss = diffusion_loss(unet, text_encoder, scheduler, next(batches), generator, accelerator.device)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(optimizer.param_groups[0]["params"], settings.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if step % settings.log_every == 0 or step == settings.steps:
            mean_loss = float(torch.stack(window).mean())
            window.clear()
            curve.append((step, mean_loss))
            rate = step * settings.batch_size * accelerator.num_processes / (time.perf_counter() - started)
            progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
            log_metrics({"train_loss": mean_loss, "lr": lr_schedule.get_last_lr()[0], "images_per_second": rate}, step)
    return curve


def save_pipeline(paths: Paths, *, vae, text_encoder, tokenizer, unet) -> None:
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=sampling_scheduler(training_scheduler()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with atomic_dir(paths.sd_model) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)


def write_loss_curve(target, curve: list[tuple[int, float]]) -> None:
    with atomic_file(target) as staging, open(staging, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows(curve)


def train(params: Params, paths: Paths) -> dict:
    settings, preset = params.train, PRESETS[params.model.preset]
    set_seed(settings.seed)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    generator = torch.Generator().manual_seed(settings.seed + accelerator.process_index)

    cache = load_latents(paths.latents, "train")
    vae = AutoencoderKL.from_pretrained(paths.vae_model)
    tokenizer = build_tokenizer(cache.captions, vocab_size=settings.tokenizer_vocab_size, max_tokens=preset.max_tokens)
    text_encoder = build_text_encoder(tokenizer, preset)
    unet = build_unet(preset, latent_channels=cache.mean.shape[1], latent_size=cache.mean.shape[-1])
    batches = batch_stream(
        cache, tokenize(tokenizer, cache.captions), tokenize(tokenizer, [""]),
        scale=vae.config.scaling_factor, settings=settings, generator=generator,
    )

    main = accelerator.is_main_process
    with training_run(params, paths) if main else nullcontext() as run:
        import mlflow

        def log_metrics(metrics: dict, step: int) -> None:
            if main:
                mlflow.log_metrics(metrics, step=step)

        started = time.perf_counter()
        curve = fit(accelerator, unet, text_encoder, batches, settings, generator, log_metrics)
        seconds = time.perf_counter() - started
        metrics = dict(
            final_loss=curve[-1][1], steps=settings.steps, seconds=seconds,
            images_per_second=settings.steps * settings.batch_size * accelerator.num_processes / seconds,
        )
        accelerator.wait_for_everyone()
        if main:
            # accelerate wraps these modules in place, so they hold the trained weights
            save_pipeline(paths, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet)
            write_json(paths.metrics / METRICS, metrics)
            write_loss_curve(paths.metrics / LOSS_PLOT, curve)
            log_metrics({"train_seconds": seconds}, settings.steps)
            log.info("train: %d steps in %.0f s, final loss %.4f (MLflow run %s)",
                     settings.steps, seconds, metrics["final_loss"], run.info.run_id)
    return metrics
