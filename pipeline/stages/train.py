"""Stage `train`: a text-conditioned denoiser of a model family (`model.family`: the UNet of sd or sdxl, the
transformer of sd3 or flux) trained on cached latents, from scratch or fine-tuned.

- scratch (`model.mode`): tokenizers built from the training captions, and the family's text encoders and
  denoiser at a size preset, trained together;
- finetune: a pretrained diffusers model (`model.pretrained`) of the family; its VAE and text encoders stay
  frozen (encode cached their outputs), and the whole denoiser or LoRA layers on it (`model.finetune`, peft)
  train.

The family (pipeline.diffusion.families) says how captions condition the denoiser, how it is called and
what it learns to predict; this module never names one. Reads data/latents and models/vae; trains with
accelerate (the same code on a CPU or GPUs); writes models/sd as the family's standard diffusers folder with
a model card (LoRA mode adds pytorch_lora_weights.safetensors, which the family pipeline's
`load_lora_weights` puts onto the base model; the folder's denoiser has the LoRA fused in), metrics/train.json,
the loss curve metrics/train_loss.csv (a DVC plot) and the MLflow run id.

Every step's data is a function of (seed, step, process): the epoch order comes from (seed, epoch) and
the step's noise from (seed, step, process); with named subsets (`ingest.subsets`) the batches draw each subset
at its share (`pipeline.training.sampling`). With `accelerator.save_state` checkpoints every
`train.checkpoint_every` steps in models/checkpoints/ (model, optimizer, LR schedule, EMA and the loss
curve), a run killed at any point and started again continues exactly where the checkpoint left it.
This module holds the data order and the loop; the model comes from `pipeline.training.modules`, the loss's math
from `pipeline.diffusion.schedule`, checkpoints from `pipeline.training.checkpoints` and the saved folder from `pipeline.training.export`.

    sdpipe train                                          # one process, as `dvc repro` runs it
    accelerate launch --num_processes 2 -m pipeline.cli train   # several processes / GPUs
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pipeline.contracts.latents import EMPTY_PROMPT_ROW, CachedLatents, MappedRows, load_latents, prompt_states
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import LOSS_PLOT, TRAIN_METRICS, write_loss_curve
from pipeline.core.atomic import write_json
from pipeline.core.config import MaskedLossParams, Params, TrainParams
from pipeline.core.errors import UserError
from pipeline.core.source_params import with_trigger
from pipeline.data.images import image_grid
from pipeline.diffusion.schedule import SAMPLE_GUIDANCE, PixelWeights, mask_weights, weighted_mse
from pipeline.evaluation.noise_metrics import noise_metrics_on
from pipeline.tracking.runs import training_run
from pipeline.training.best import BestKeeper
from pipeline.training.checkpoints import (
    Progress,
    checkpoint_folders,
    remove_checkpoints,
    resumable_checkpoint,
    save_checkpoint,
    save_lora_checkpoints_only,
    training_fingerprint,
)
from pipeline.training.export import model_card, save_model
from pipeline.training.modules import (
    WEIGHT_DTYPES,
    EmaWeights,
    Model,
    build_model,
    denoiser_weights_mb,
    make_optimizer,
    place_modules,
    trained_denoiser_parameters,
)
from pipeline.training.prior import ImagePrior, PredictionPrior, prior_loss_of
from pipeline.training.sampling import SubsetSampler, derived_seed, subset_sampler
from pipeline.training.speedups import apply_speed_settings, compile_unet
from pipeline.training.throughput import (
    Throughput,
    flops_of,
    measured_matmul_flops_per_second,
    peak_memory_mb,
    utilisation,
)
from pipeline.training.validation import ValidationGrid, embedded_prompt_arguments

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = 8


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


@lru_cache(maxsize=2)
def epoch_batches(group_sizes: tuple[int, ...], size: int, seed: int, epoch: int) -> list[tuple[int, torch.Tensor]]:
    """One epoch's micro-batches as (size group, positions in the group): each group's samples in an order
    fixed by (seed, epoch, group), cut into batches of `size` (a group's last one may be smaller), the batches
    of all groups then shuffled. Every sample once; a batch never mixes image sizes."""
    batches = []
    for group, count in enumerate(group_sizes):
        order = torch.randperm(count, generator=torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch, group)))
        batches += [(group, order[start : start + size]) for start in range(0, count, size)]
    shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(derived_seed(seed, "batches", epoch)))
    return [batches[i] for i in shuffle.tolist()]


def batch_indices(micro_batch: int, group_sizes: tuple[int, ...], batch_size: int, processes: int, process: int,
                  seed: int) -> tuple[int, torch.Tensor]:
    """This process's (size group, positions) for the n-th micro-batch of the run: a function of its
    arguments alone. With several processes an epoch's last few batches (fewer than the processes) wait for
    the next epoch, which shuffles again."""
    size = min(batch_size, sum(group_sizes) // processes)
    batches_per_epoch = sum(math.ceil(count / size) for count in group_sizes)
    epoch, position = divmod(micro_batch, batches_per_epoch // processes)
    return epoch_batches(tuple(group_sizes), size, seed, epoch)[position * processes + process]


@dataclass
class Batch:
    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    image_sizes: torch.Tensor  # per sample: original height and width, crop top and left, height and width
    pixel_weights: PixelWeights | None = None  # train.masked_loss: each latent pixel's weight; None: unmasked


@dataclass(frozen=True)
class Conditioning:
    """What each training sample conditions the denoiser on: token ids per tokenizer (scratch, where the text
    encoders train) or the frozen text encoders' cached outputs by name (finetune)."""

    tables: dict[str, torch.Tensor | MappedRows]  # ids per sample, or states per distinct caption (read as needed)
    rows: torch.Tensor  # each sample's row in the tables
    empty: dict[str, torch.Tensor]  # the empty prompt's entries: the unconditional branch of guidance

    def for_samples(self, samples: torch.Tensor, dropout: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The samples' entries, a share `dropout` of them (the same samples in every table) replaced by the
        empty prompt's."""
        dropped = torch.rand(len(samples), generator=generator) < dropout
        chosen = {}
        for name, table in self.tables.items():
            values = table[self.rows[samples]]
            chosen[name] = torch.where(dropped.view(-1, *[1] * (values.dim() - 1)),
                                       self.empty[name].expand_as(values), values)
        return chosen


def make_batch(cache: CachedLatents, conditioning: Conditioning, group_index: int, positions: torch.Tensor, *,
               to_denoiser, caption_dropout: float, random_flip: bool, generator: torch.Generator,
               masked_loss: MaskedLossParams | None = None) -> Batch:
    """Latents sampled from the cached posteriors (in the denoiser's space, `to_denoiser`: the family's latent
    space's normalisation; half of them mirrored when flipping), and their captions with dropout; with an enabled
    `masked_loss`, the weights of their masks (a mirrored sample's mirrored mask)."""
    group = cache.groups[group_index]
    mean, std = group.mean[positions].float(), group.std[positions].float()
    noise = torch.randn(mean.shape, generator=generator)
    masked = masked_loss is not None and masked_loss.enabled
    masks = group.mask[positions] if masked else None
    if random_flip:
        mirrored = (torch.rand(len(positions), generator=generator) < 0.5)[:, None, None, None]
        mean = torch.where(mirrored, group.flip_mean[positions].float(), mean)
        std = torch.where(mirrored, group.flip_std[positions].float(), std)
        masks = torch.where(mirrored, group.flip_mask[positions], masks) if masked else None
    latents = to_denoiser(mean + std * noise)
    samples = group.rows[positions]
    pixels = mask_weights(masks, masked_loss.unmasked_weight, masked_loss.normalize_by_area) if masked else None
    return Batch(latents, conditioning.for_samples(samples, caption_dropout, generator), cache.image_sizes[samples],
                 pixels)


def check_masks(masked_loss: MaskedLossParams, cache: CachedLatents) -> None:
    """A masked loss over data without masks would silently be the plain loss: refuse it, saying why."""
    if not masked_loss.enabled:
        return
    if cache.groups[0].mask is None:
        raise ValueError("train: train.masked_loss.enabled but data/latents holds no masks; run preprocess and encode "
                         "again with preprocess.masks: true (dvc repro does)")
    if not cache.masked_samples:
        raise ValueError("train: train.masked_loss.enabled but no training image has a mask (no mask file, no "
                         "alpha channel); give the images masks, or set train.masked_loss.enabled: false")
    log.info("train: masked loss on %d of %d training images (the others weigh 1 everywhere)", cache.masked_samples,
             len(cache))


def diffusion_loss(model: Model, batch: Batch, settings: TrainParams, generator: torch.Generator,
                   device) -> torch.Tensor:
    noisy = model.objective.training_batch(batch.latents.to(device), generator, settings.noise_offset)
    conditioning = model.condition({name: value.to(device) for name, value in batch.conditioning.items()})
    prediction = model.family.predict(model.denoiser, noisy.noisy, noisy.timesteps, conditioning, batch.image_sizes)
    return weighted_mse(prediction, noisy.target, noisy.weights, batch.pixel_weights)


@dataclass
class Run:
    """One training: the prepared modules, the data and where progress is logged."""

    accelerator: Accelerator
    model: Model
    settings: TrainParams
    cache: CachedLatents
    val: CachedLatents
    conditioning: Conditioning
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    progress: Progress
    ema: EMAModel | None
    log_metrics: Callable[[dict, int], None]
    log_image: Callable[[object, str], None]
    sampler: SubsetSampler | None = None  # named subsets' batches; None: epochs of the whole split
    prior: ImagePrior | PredictionPrior | None = None  # train.prior's loss; None: the plain diffusion loss
    validation: ValidationGrid | None = None  # validation prompts beside the base column; None: sample_grid
    best: BestKeeper | None = None  # train.keep_best

    def optimizer_step(self) -> None:
        """A no-op on micro-batches that only accumulate gradients (accelerate's wrappers know)."""
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_lr(self) -> float:
        return self.lr_schedule.get_last_lr()[0]

    def evaluation_weights(self):
        """Use the EMA weights (when kept) for validation, samples and the saved model."""
        if self.ema is None:
            return nullcontext()
        return EmaWeights(self.ema, self.ema_parameters())

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        return trained_denoiser_parameters(self.accelerator, self.model.denoiser)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The held-out noise MSE, a training batch at a time, on the cached text states in finetune mode."""
        group = self.val.single_size()
        cached = None if self.model.trains_text_encoder else lambda rows: self.val.text_states_of(group.rows[rows])
        with self.evaluation_weights(), self.accelerator.autocast():
            metrics = noise_metrics_on(self.model.pipeline(self.accelerator), group.mean,
                                       self.val.captions[:self.settings.validation_samples],
                                       self.settings.validation_timesteps, self.settings.seed,
                                       batch_size=self.settings.batch_size, text_states=cached)
        return metrics["noise_mse"]

    @torch.no_grad()
    def sample_grid(self):
        """Samples of the first distinct validation captions (finetune: from their cached text states)."""
        firsts = first_captions(self.val)
        prompts = list(firsts)
        with self.evaluation_weights(), self.accelerator.autocast():
            pipeline = self.model.pipeline(self.accelerator)
            arguments = self.model.family.sampling_arguments(pipeline, prompts, SAMPLE_GUIDANCE)
            if not self.model.trains_text_encoder:
                arguments = self.model.family.with_cached_states(cached_prompt_arguments(
                    arguments, self.val, [firsts[prompt] for prompt in prompts], self.accelerator.device))
            images = pipeline(
                **arguments,
                num_inference_steps=self.settings.sample_steps,
                generator=[torch.Generator().manual_seed(self.settings.seed + i) for i in range(len(prompts))],
            ).images
        return image_grid([images])

    @torch.no_grad()
    def validation_step(self, step: int) -> None:
        """The validation prompts' grid beside the base column, its metric, and the best step so far."""
        with self.evaluation_weights(), self.accelerator.autocast():
            images = self.validation.sample(self.model.pipeline(self.accelerator), self.model.family,
                                            self.accelerator.device)
            metrics = self.validation.score(images)
            if self.best is not None:
                self.best.offer(step, metrics, [self.accelerator.unwrap_model(module)
                                                for module in self.model.trained_modules()])
        self.log_image(self.validation.grid(images), f"samples/step-{step:07d}.png")
        self.log_metrics(metrics, step)

    def save_validation_state(self, checkpoint: Path) -> None:
        """What a resumed run needs of the validation: the base column and the best so far."""
        if self.validation is not None:
            self.validation.save_base(checkpoint)
        if self.best is not None:
            self.best.save_into(checkpoint)


def first_captions(val: CachedLatents) -> dict[str, int]:
    """The first SAMPLE_PROMPTS distinct validation captions, each with its first sample's position."""
    firsts = {}
    for position, caption in enumerate(val.captions):
        firsts.setdefault(caption, position)
    return dict(list(firsts.items())[:SAMPLE_PROMPTS])


def cached_prompt_arguments(arguments: dict, val: CachedLatents, samples: list[int], device) -> dict:
    """A sampler call's prompts replaced by the validation samples' cached text states."""
    empty = {name: table[EMPTY_PROMPT_ROW] for name, table in val.text_states.items()}
    return embedded_prompt_arguments(arguments, val.text_states_of(torch.tensor(samples)), empty, device)


def validation_grid(params: Params, paths: Paths, model: Model, val: CachedLatents) -> ValidationGrid | None:
    """The validation prompts' grid (or, with only train.sample_metric set, the first validation captions'), with
    their cached text states in finetune mode and the sample metric's judge; None: today's sample grid alone."""
    settings = params.train
    if not settings.sample_every or (not settings.validation_prompts and settings.sample_metric is None):
        return None
    from pipeline.evaluation.sample_metric import sample_judge  # scikit-learn and CLIP's code, only when asked for

    prompts = with_trigger(settings.validation_prompts, params.ingest.trigger) or list(first_captions(val))
    judge = sample_judge(settings.sample_metric, params.evaluate, paths, prompts)
    states = None
    if not model.trains_text_encoder and settings.validation_prompts:
        states = prompt_states(paths.latents, prompts)
    elif not model.trains_text_encoder:
        states = (val.text_states_of(torch.tensor(list(first_captions(val).values()))),
                  {name: table[EMPTY_PROMPT_ROW] for name, table in val.text_states.items()})
    return ValidationGrid(prompts, list(settings.validation_seeds), settings.sample_steps, states, judge)


def start_validation(run: Run, checkpoint: Path | None) -> None:
    """The base column (and its metric, at step 0): rendered before the first update, under LoRA with the adapters
    off; a resumed full or scratch run takes it from its checkpoint."""
    model = run.model
    if checkpoint is not None and not model.lora:
        if not run.validation.load_base(checkpoint):
            raise RuntimeError(f"train: checkpoint {checkpoint} holds no validation base column to resume with")
        return
    with run.accelerator.autocast():
        run.validation.render_base(model.pipeline(run.accelerator), model.family, run.accelerator.device,
                                   run.accelerator.unwrap_model(model.denoiser) if model.lora else None)
    if checkpoint is None:
        run.log_metrics(run.validation.base_metrics, 0)


def fit(run: Run, paths: Paths, fingerprint: dict, start_step: int) -> Throughput:
    """The optimisation loop from `start_step` on; progress (curve, data digest) accumulates in run.progress.
    Returns its timings. The last step writes no checkpoint: a finished run is never resumed."""
    accelerator, settings, model = run.accelerator, run.settings, run.model
    parameters = model.trainable_parameters()
    window, grad_norm = [], torch.tensor(0.0)
    speed = Throughput(accelerator.device, settings.steps - start_step)
    group_sizes = tuple(len(group) for group in run.cache.groups)
    progress = tqdm(range(start_step + 1, settings.steps + 1), desc="train", initial=start_step, total=settings.steps,
                    disable=not accelerator.is_local_main_process)
    for step in progress:
        images = 0
        for micro in range(settings.gradient_accumulation_steps):
            micro_batch = (step - 1) * settings.gradient_accumulation_steps + micro
            if run.sampler is None:
                group, positions = batch_indices(micro_batch, group_sizes, settings.batch_size,
                                                 accelerator.num_processes, accelerator.process_index, settings.seed)
            else:
                group, positions = run.sampler.batch(micro_batch * accelerator.num_processes
                                                     + accelerator.process_index)
            run.progress.saw(group, positions)
            generator = torch.Generator().manual_seed(derived_seed(settings.seed, "step", micro_batch,
                                                                   accelerator.process_index))
            batch = make_batch(run.cache, run.conditioning, group, positions, to_denoiser=model.denoiser_latents,
                               caption_dropout=settings.caption_dropout, random_flip=settings.random_flip,
                               generator=generator, masked_loss=settings.masked_loss)
            images += len(positions) * accelerator.num_processes
            with accelerator.accumulate(*model.trained_modules()), accelerator.autocast():
                loss = training_loss(run.prior, model, batch, run.cache.groups[group].rows[positions], settings,
                                     generator, accelerator.device)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(parameters, settings.max_grad_norm)
                run.optimizer_step()
            window.append(loss.detach())
        if run.ema is not None:
            run.ema.step(run.ema_parameters())
        run.progress.step = step
        speed.step_done(images)
        if step % settings.log_every == 0 or step == settings.steps or step % settings.checkpoint_every == 0:
            # the one host sync per logging window: a NaN stops the run before it is checkpointed
            mean_loss = float(torch.stack(window).mean())
            if not torch.isfinite(torch.tensor(mean_loss)):
                last = checkpoint_folders(paths)
                raise TrainingDiverged(
                    f"train: the loss became {mean_loss} in the steps up to {step}; the last good checkpoint is "
                    f"{last[-1] if last else 'none'} (lower train.learning_rate, or set train.mixed_precision: 'no')"
                )
            window.clear()
            run.progress.curve.append([step, mean_loss])
            rate = speed.images_per_second()
            progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
            run.log_metrics({"train_loss": mean_loss, "lr": run.optimizer_lr(), "grad_norm": float(grad_norm),
                             "images_per_second": rate, "peak_memory_mb": peak_memory_mb(accelerator.device)}, step)
        if step % settings.validate_every == 0 or step == settings.steps:
            with speed.excluded("validation"):
                run.log_metrics({"val_loss": run.validation_loss()}, step)
        if settings.sample_every and step % settings.sample_every == 0 and accelerator.is_main_process:
            with speed.excluded("sampling"):
                if run.validation is None:
                    run.log_image(run.sample_grid(), f"samples/step-{step:07d}.png")
                else:
                    run.validation_step(step)
        if step % settings.checkpoint_every == 0 and step < settings.steps:
            with speed.excluded("checkpoint"):
                save_checkpoint(accelerator, paths, step, fingerprint, settings.checkpoints_kept,
                                extra=run.save_validation_state)
        if run.best is not None and settings.early_stopping_patience and stops_early(run, step):
            break
    return speed


def stops_early(run: Run, step: int) -> bool:
    """Early stopping's decision at a sample step, made on the main process (which alone samples) for all."""
    if step % run.settings.sample_every:
        return False
    return broadcast_object_list([run.accelerator.is_main_process and run.best.should_stop(step)])[0]


def conditioning_of(model: Model, cache: CachedLatents) -> Conditioning:
    if model.trains_text_encoder:
        empty = model.family.token_ids(model.text, [""])
        return Conditioning(model.family.token_ids(model.text, cache.captions), torch.arange(len(cache)),
                            {name: ids[0] for name, ids in empty.items()})
    return Conditioning(cache.text_states, cache.text_rows,
                        {name: states[EMPTY_PROMPT_ROW] for name, states in cache.text_states.items()})


def training_loss(prior: ImagePrior | PredictionPrior | None, model: Model, batch, samples: torch.Tensor,
                  settings: TrainParams, generator: torch.Generator, device) -> torch.Tensor:
    """The loss a step trains on: the diffusion loss, or the prior's (which holds it) for `samples`, the batch's
    training samples."""
    if prior is None:
        return diffusion_loss(model, batch, settings, generator, device)
    return prior.loss(model, batch, samples, settings, generator, device)


def flops_per_image(model: Model, cache: CachedLatents, conditioning: Conditioning, settings: TrainParams,
                    accelerator: Accelerator, prior: ImagePrior | PredictionPrior | None) -> int:
    """The FLOPs of training on one image (the loss's forward and backward passes, the prediction prior's extra
    forwards too), counted once, before training."""
    generator = torch.Generator().manual_seed(derived_seed(settings.seed, "flops"))
    positions = torch.tensor([0])
    batch = make_batch(cache, conditioning, 0, positions, to_denoiser=model.denoiser_latents,
                       caption_dropout=0.0, random_flip=False, generator=generator)

    def one_image() -> None:
        with accelerator.autocast():
            loss = training_loss(prior, model, batch, cache.groups[0].rows[positions], settings, generator,
                                 accelerator.device)
        loss.backward()

    flops = flops_of(one_image)
    for parameter in model.trainable_parameters():
        parameter.grad = None
    return flops


def prepared_optimisation(accelerator: Accelerator, model: Model, settings: TrainParams) -> tuple[object, object]:
    """The optimizer and LR schedule, prepared with the trained modules (which replace the model's). accelerate
    steps a prepared schedule once per process at each optimizer step, so its lengths are counted in those
    steps, as diffusers' training scripts count them: the LR at each step is the same on any number of processes."""
    optimizer = make_optimizer(model.trainable_parameters(), settings, accelerator.device)
    lr_schedule = get_scheduler(settings.lr_schedule, optimizer,
                                num_warmup_steps=settings.warmup_steps * accelerator.num_processes,
                                num_training_steps=settings.steps * accelerator.num_processes)
    *trained, optimizer, lr_schedule = accelerator.prepare(*model.trained_modules(), optimizer, lr_schedule)
    model.replace_trained_modules(trained)
    return optimizer, lr_schedule


def export(accelerator: Accelerator, run: Run, params: Params, paths: Paths, card: Callable[[Path], str]) -> None:
    """models/sd with the evaluation weights. Under LoRA the layers are copied out and the training denoiser (the
    base in the weight dtype) freed before export loads the base to fuse them into: one base in memory at a time."""
    model = run.model
    with run.evaluation_weights():
        trained = model.trained_components(accelerator)
        lora_layers = model.family.lora_layers(trained[model.family.denoiser]) if model.lora else None
        sample_size = trained[model.family.denoiser].config.sample_size
        if not model.lora:
            save_model(model.family, trained, params.model, paths, card, sample_size=sample_size)
            return
    trained[model.family.denoiser] = model.denoiser = None
    accelerator.free_memory()
    gc.collect()  # free_memory collects before it drops its references, and prepare's autocast forward is a cycle
    save_model(model.family, trained, params.model, paths, card, lora_layers=lora_layers, sample_size=sample_size)


def train(params: Params, paths: Paths, *, tracked: bool = True) -> dict:
    """The stage. `tracked=False` (bench/gpu.py) logs nothing to MLflow and needs no MLflow installed."""
    settings = params.train
    set_seed(settings.seed)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision,
                              gradient_accumulation_steps=settings.gradient_accumulation_steps)
    device = accelerator.device
    cache, val = load_latents(paths.latents, "train"), load_latents(paths.latents, "val")
    check_masks(settings.masked_loss, cache)
    if len(cache) < accelerator.num_processes:
        raise ValueError(f"train: {len(cache)} training samples cannot feed {accelerator.num_processes} processes")
    model = build_model(params.model, params.train, paths, cache, val)
    place_modules(model, device, WEIGHT_DTYPES[settings.mixed_precision], params.model)
    apply_speed_settings(model.denoiser, settings, device)
    conditioning = conditioning_of(model, cache)
    prior = prior_loss_of(settings.prior, cache)
    flops = flops_per_image(model, cache, conditioning, settings, accelerator, prior)
    optimizer, lr_schedule = prepared_optimisation(accelerator, model, settings)
    if model.lora:
        save_lora_checkpoints_only(accelerator)
    ema = EMAModel(trained_denoiser_parameters(accelerator, model.denoiser), decay=settings.ema_decay) \
        if settings.ema_decay else None
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    sampler = subset_sampler(params.ingest.subsets, cache.subsets, len(cache.groups), settings.batch_size,
                             settings.seed)
    fingerprint = training_fingerprint(params.model, params.train, paths, accelerator.num_processes)
    if sampler is not None:
        fingerprint["subset_shares"] = sampler.describe()
    checkpoint = resumable_checkpoint(paths, fingerprint, settings.steps)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        log.info("train: resuming from %s (step %d of %d)", checkpoint, progress.step, settings.steps)
    best = BestKeeper(settings.keep_best, settings.early_stopping_patience, settings.sample_every,
                      paths.checkpoints) if settings.keep_best else None
    if best is not None and accelerator.is_main_process and checkpoint is not None:
        best.restore_from(checkpoint)
    elif best is not None and accelerator.is_main_process:
        best.remove()
    start_step = progress.step
    compile_unet(model.denoiser, settings)
    peak = measured_matmul_flops_per_second(device)

    main = accelerator.is_main_process
    logged = tracked and main
    with training_run(params, paths, progress.mlflow_run_id) if logged else nullcontext() as mlflow_run:
        mlflow = importlib.import_module("mlflow") if logged else None
        progress.mlflow_run_id = mlflow_run.info.run_id if logged else None
        run = Run(
            accelerator, model, settings, cache, val, conditioning=conditioning,
            optimizer=optimizer, lr_schedule=lr_schedule, progress=progress, ema=ema,
            log_metrics=lambda metrics, step: mlflow.log_metrics(metrics, step=step) if logged else None,
            log_image=lambda image, name: mlflow.log_image(image, name) if logged else None, sampler=sampler,
            validation=validation_grid(params, paths, model, val) if main else None, best=best,
            prior=prior,
        )
        if run.validation is not None:
            start_validation(run, checkpoint)
        started = time.perf_counter()
        speed = fit(run, paths, fingerprint, start_step)
        seconds = time.perf_counter() - started
        throughput = speed.summary()
        metrics = dict(
            final_loss=progress.curve[-1][1], steps=settings.steps, resumed_from_step=start_step,
            seconds=seconds, train_samples=len(cache), processes=accelerator.num_processes, **throughput,
            flops_per_image=flops, **utilisation(throughput["images_per_second"], flops, peak),
            peak_memory_mb=peak_memory_mb(device),
            trainable_parameters=sum(p.numel() for p in model.trainable_parameters()),
            denoiser_weights_mb=denoiser_weights_mb(accelerator.unwrap_model(model.denoiser)),
        )
        if progress.step < settings.steps:
            metrics["stopped_early_at_step"] = progress.step
        accelerator.wait_for_everyone()
        if main:
            if best is not None and best.step is not None:
                metrics.update(best.metrics())
                best.load_best_into([accelerator.unwrap_model(module) for module in model.trained_modules()])
                run.ema = None  # the kept weights are the evaluation weights the samples were drawn with
            prompt = next((caption for caption in cache.captions if caption), "")
            export(accelerator, run, params, paths,
                   lambda folder: model_card(folder, model.family, params.model, params.train, paths, metrics,
                                             prompt))
            write_json(paths.metrics / TRAIN_METRICS, {**metrics, "data_digest": progress.data_digest})
            write_loss_curve(paths.metrics / LOSS_PLOT, progress.curve)
            remove_checkpoints(paths, fingerprint)
            if best is not None:
                best.remove()
            run.log_metrics({"train_seconds": seconds, **{f"train_{name}": value for name, value in metrics.items()
                                                          if name != "final_loss"}}, settings.steps)
            log.info("train: steps %d-%d in %.0f s, final loss %.4f, %.1f images/s in the steady state%s",
                     start_step + 1, settings.steps, seconds, metrics["final_loss"], metrics["images_per_second"],
                     f" (MLflow run {mlflow_run.info.run_id})" if logged else "")
    return metrics
