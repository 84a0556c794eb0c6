"""Prior preservation's loss (`train.prior`): the subject is learned while the class it belongs to keeps looking as
the base model drew it.

- images: the class images (rendered by the class_images stage, trained as `class_subset`) share the batches with
  the subject's; the loss is diffusers' DreamBooth formula, the subject samples' mean squared error plus
  `prior_loss_weight` times the class samples' (each a mean over its own samples);
- prediction (OneTrainer's prior prediction, ai-toolkit's output preservation): every sample is also conditioned
  on its class prompt (its caption with the trigger replaced by `class_word`, cached by encode), and the LoRA
  model's prediction for it, on the same noisy latents, is pulled towards the base model's (the same denoiser
  with its LoRA layers switched off, one forward without gradients), weighted by `prior_loss_weight`. At step 0
  the LoRA layers add nothing (peft initialises B to zero), so this term starts at 0.

A run without a prior never comes here: train's own loss is unchanged. With `train.masked_loss` each sample's
diffusion loss is weighted by its mask (class images by their own, or 1 everywhere); the prediction prior's term
compares with the base model over the whole image, unmasked: the class is preserved everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel

from pipeline.contracts.latents import CachedLatents, MappedRows
from pipeline.core.config import TrainParams
from pipeline.core.prior_params import IMAGE_PRIOR, PREDICTION_PRIOR, PriorParams
from pipeline.diffusion.schedule import per_sample_mse, weighted_mse
from pipeline.training.validation import adapters_disabled


def dreambooth_loss(per_sample: torch.Tensor, is_class: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """diffusers' train_dreambooth formula on a batch of any mix: mean over the subject samples plus the weight
    times the mean over the class samples (a part the batch lacks adds nothing)."""
    subject, reference = per_sample[~is_class], per_sample[is_class]
    loss = subject.mean() if len(subject) else per_sample.new_zeros(())
    return loss + prior_loss_weight * reference.mean() if len(reference) else loss


@dataclass(frozen=True)
class ImagePrior:
    """The class images' loss weighted: samples of `class_subset` are the class half."""

    is_class: np.ndarray  # per training sample: in the class subset
    prior_loss_weight: float

    def loss(self, model, batch, samples: torch.Tensor, settings: TrainParams, generator: torch.Generator,
             device) -> torch.Tensor:
        noisy = model.objective.training_batch(batch.latents.to(device), generator, settings.noise_offset)
        conditioning = model.condition({name: value.to(device) for name, value in batch.conditioning.items()})
        prediction = model.family.predict(model.denoiser, noisy.noisy, noisy.timesteps, conditioning,
                                          batch.image_sizes)
        is_class = torch.from_numpy(self.is_class[samples.numpy()]).to(device)
        return dreambooth_loss(per_sample_mse(prediction, noisy.target, noisy.weights, batch.pixel_weights), is_class,
                               self.prior_loss_weight)


@dataclass(frozen=True)
class PredictionPrior:
    """The base model's prediction for each sample's class prompt as a second target."""

    tables: dict[str, MappedRows]  # the cached text states
    class_rows: torch.Tensor  # per training sample: its class prompt's row in the tables
    prior_loss_weight: float

    def class_conditioning(self, samples: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: table[self.class_rows[samples]] for name, table in self.tables.items()}

    def loss(self, model, batch, samples: torch.Tensor, settings: TrainParams, generator: torch.Generator,
             device) -> torch.Tensor:
        """One forward of the LoRA model on the samples under their captions and their class prompts together
        (as diffusers' DreamBooth batches instance and class halves), one of the base on the class prompts."""
        noisy = model.objective.training_batch(batch.latents.to(device), generator, settings.noise_offset)
        caption = model.condition({name: value.to(device) for name, value in batch.conditioning.items()})
        reference = model.condition({name: value.to(device) for name, value in self.class_conditioning(samples).items()})
        both = {name: torch.cat([caption[name], reference[name]]) for name in caption}
        prediction, class_prediction = model.family.predict(
            model.denoiser, noisy.noisy.repeat(2, *[1] * (noisy.noisy.dim() - 1)), noisy.timesteps.repeat(2),
            both, batch.image_sizes.repeat(2, 1)).chunk(2)
        base = extract_model_from_parallel(model.denoiser)  # around DDP: a forward that no backward follows
        with torch.no_grad(), adapters_disabled(base):
            target = model.family.predict(base, noisy.noisy, noisy.timesteps, reference, batch.image_sizes)
        return (weighted_mse(prediction, noisy.target, noisy.weights, batch.pixel_weights)
                + self.prior_loss_weight * weighted_mse(class_prediction, target, noisy.weights))


def prior_loss_of(prior: PriorParams, cache: CachedLatents) -> ImagePrior | PredictionPrior | None:
    """The run's prior loss; None without one (train's plain loss)."""
    if prior.kind == IMAGE_PRIOR:
        return ImagePrior(np.asarray(cache.subsets, dtype=object) == prior.class_subset, prior.prior_loss_weight)
    if prior.kind == PREDICTION_PRIOR:
        if cache.class_text_rows is None:
            raise ValueError("train: train.prior.kind is prediction but data/latents holds no class prompts; run "
                             "`sdpipe encode` again (dvc repro does)")
        return PredictionPrior(cache.text_states, cache.class_text_rows, prior.prior_loss_weight)
    return None
