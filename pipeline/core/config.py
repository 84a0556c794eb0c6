"""Typed parameters: every section of params.yaml, its keys, defaults and checks (the ingest section and its
sources are in pipeline.core.source_params, the validate section in pipeline.core.validate_params).

Every stage receives a validated `Params` object (pipeline.core.params_file reads it). An unknown or
mistyped key fails with a message that names the key (for example `params.yaml: train.lerning_rate:
unknown key`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.core.errors import UserError
from pipeline.core.family_declarations import declared_families
from pipeline.core.cron import cron_problem
from pipeline.core.prior_params import PriorParams, check_prior_fits
from pipeline.core.section import Section
from pipeline.core.source_params import TRIGGER, IngestParams
from pipeline.core.validate_params import ValidateParams


class ConfigError(UserError, ValueError):
    """A parameter file that cannot be used, with the offending key in the message."""


class PreprocessParams(Section):
    """Decoding, resizing, cropping and splitting the validated images (pipeline/stages/preprocess.py)."""

    resolution: int = Field(32, ge=8, description="side of the square images trained on, in pixels: a multiple of 8, "
                                                  "and of 16 for sd3 and flux fine-tuned (8x VAE, 2x2 latent patches)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of samples in val, chosen by a hash of each id")
    crop: Literal["center", "random"] = Field(
        "center", description="random: one crop per sample, fixed by its id and `seed`, so re-runs agree")
    seed: int = Field(0, description="seeds the random crops")
    lowercase_captions: bool = Field(False, description="lower-case captions (always NFC, whitespace collapsed)")
    bucketing: bool = Field(False, description="train images keep their aspect ratio in buckets; val stays square")
    bucket_step: int = Field(8, ge=8, description="bucket sides are multiples of this; 64 for Stable Diffusion UNets")
    max_bucket_ratio: float = Field(2.0, ge=1, description="the most elongated bucket, long side / short side")
    masks: bool = Field(False, description="keep each image's mask (its mask file, else its alpha channel), cropped "
                                           "like the image (train.masked_loss); off: masks are not used")

    @field_validator("resolution")
    @classmethod
    def _divisible_by_eight(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8 (the VAE downsamples by 4 and the UNet by 2)")
        return value

    @field_validator("bucket_step")
    @classmethod
    def _divides_the_square(cls, value: int, info: ValidationInfo) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8 (every bucket side must be, like preprocess.resolution)")
        resolution = info.data.get("resolution")
        if info.data.get("bucketing") and resolution and resolution % value:
            raise ValueError(f"must divide preprocess.resolution ({resolution}) when preprocess.bucketing is on, "
                             "so that the square bucket is the square val images are cropped to")
        return value


class VaeParams(Section):
    """The scratch VAE (pipeline/stages/vae.py); fine-tuning uses the pretrained model's VAE instead."""

    block_out_channels: tuple[int, ...] = Field(
        (16, 32, 32), min_length=1, description="channels per level; each level after the first halves the side "
                                                "(3 levels: 32 px -> 8x8 latents)")
    latent_channels: int | None = Field(None, ge=1, description="null: the family's (docs/guides/model-families.md)")
    steps: int = Field(2000, ge=1, description="optimizer steps (AdamW, cosine decay to 0)")
    batch_size: int = Field(16, ge=1, description="images per step")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW's initial learning rate")
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term beside the reconstruction loss")
    seed: int = Field(0, description="seeds the initial weights and the batches")

    @field_validator("block_out_channels")
    @classmethod
    def _groups_divide_the_channels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        groups = min(8, min(value))  # the scratch VAE's GroupNorm groups (pipeline/diffusion/latent_space.py)
        if groups < 1 or any(channels % groups for channels in value):
            raise ValueError("must list positive channel counts, each a multiple of 8 (or of the smallest, when it "
                             "is below 8: the VAE's normalisation groups)")
        return value
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="the scratch VAE's training precision (its own: train.mixed_precision retrains no VAE)")


class EncodeParams(Section):
    """Caching VAE latents and frozen text-encoder states once (pipeline/stages/encode.py)."""

    batch_size: int = Field(256, ge=1, description="images per VAE call")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="the frozen encoders run and their cached outputs are stored in this dtype")
    mirrored: bool = Field(False, description="also cache the latents of the mirror images (train.random_flip "
                                              "needs them)")


class LoraParams(Section):
    """LoRA layers (peft) on the frozen denoiser, when model.finetune is lora."""

    rank: int = Field(4, ge=1, description="inner dimension of each LoRA update")
    alpha: float = Field(4.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA layers' input while training")
    target_modules: tuple[str, ...] | None = Field(
        None, min_length=1, description="denoiser layers that get LoRA layers; null: the family's default")
    quantize_base: Literal["int8"] | None = Field(
        None, description="int8: the frozen denoiser's linear weights stored in int8 while training (torchao "
                          "weight-only); the saved model fuses the LoRA layers into the full-precision base")
    use_dora: bool = Field(False, description="DoRA (weight-decomposed LoRA, peft's use_dora): a magnitude per "
                                              "output channel trained beside the LoRA layers; diffusers loads it")
    export: tuple[Literal["diffusers", "kohya"], ...] = Field(
        ("diffusers",), min_length=1, description="the LoRA files models/sd carries: diffusers (always: the file "
        "load_lora_weights reads), and kohya (sd, sdxl: the lora_unet_ key layout ComfyUI loads)")

    @field_validator("export")
    @classmethod
    def _diffusers_file_is_kept(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "diffusers" not in value:
            raise ValueError("must include diffusers: models/sd's own LoRA file, which the saved model is fused "
                             "from; kohya is written beside it")
        return tuple(dict.fromkeys(value))


# Each family's presets, objective, latent channels and patch, as its module declares them
FAMILY_DECLARATIONS = declared_families()
FAMILIES = tuple(FAMILY_DECLARATIONS)
PRODIGY_LEARNING_RATES = (0.1, 10.0)  # Prodigy's lr scales its own step-size estimate: 1.0 is its default
PRETRAINED_VAE_DOWNSAMPLING = 8  # every family's released VAE, SD 1.x to Flux.1
TRAINING_TIMESTEPS = 1000  # DDPM's (pipeline/diffusion/schedule.py); flow matching reads t as σ = t / 1000


def _training_timesteps(value: tuple[int, ...]) -> tuple[int, ...]:
    if not value or not all(0 <= timestep < TRAINING_TIMESTEPS for timestep in value):
        raise ValueError(f"must list timesteps from 0 to {TRAINING_TIMESTEPS - 1} (the {TRAINING_TIMESTEPS} "
                         "training timesteps)")
    return value


TrainingTimesteps = Annotated[tuple[int, ...], AfterValidator(_training_timesteps)]


def latent_channels_of(vae: VaeParams, family: str) -> int:
    """The scratch VAE's latent channels: vae.latent_channels, else the family's."""
    return vae.latent_channels or FAMILY_DECLARATIONS[family].latent_channels


class ModelParams(Section):
    """What is trained: the family, scratch or fine-tuned, and how."""

    family: Literal[FAMILIES] = Field("sd", description="the architecture (docs/guides/model-families.md)")
    mode: Literal["scratch", "finetune"] = Field(
        "scratch", description="scratch: VAE, text encoders and denoiser trained here; finetune: from model.pretrained")
    preset: str = Field("tiny", description="scratch mode: the model sizes, one of the family's presets")
    pretrained: str | None = Field(None, description="finetune mode: a diffusers folder or a hub id")
    finetune: Literal["lora", "full"] = Field("lora", description="finetune mode: LoRA layers or the whole denoiser")
    max_sequence_length: int = Field(77, ge=1, le=512, description="sd3, flux, chroma: T5 tokens per caption "
                                                          "(zimage: Qwen3's, chat template included; truncated or "
                                                          "padded to it) in training, the encode cache and sampling")
    lora: LoraParams = Field(LoraParams(), description="the LoRA layers (model.finetune: lora)")

    @model_validator(mode="after")
    def _finetune_names_its_model(self) -> ModelParams:
        if self.mode == "finetune" and not self.pretrained:
            raise PydanticCustomError(
                "missing_setting",
                "model.pretrained: required when model.mode is finetune (a diffusers folder or a hub id)", {})
        return self

    @model_validator(mode="after")
    def _family_has_the_preset(self) -> ModelParams:
        presets = FAMILY_DECLARATIONS[self.family].presets
        if self.preset not in presets:
            raise PydanticCustomError(
                "missing_setting", "model.preset: '{preset}' is not a preset of model.family {family} ({presets})",
                {"preset": self.preset, "family": self.family, "presets": ", ".join(presets)})
        return self


class FlowParams(Section):
    """Flow matching (sd3, flux, chroma, zimage; pipeline/diffusion/flow_matching.py): how σ is drawn, shifted and
    weighted."""

    sampling: Literal["uniform", "logit_normal", "mode"] = Field(
        "logit_normal", description="how u (σ before the shift) is drawn: uniform, logit_normal (sigmoid of "
                                    "N(logit_mean, logit_std)) or mode (SD3's, scaled by mode_scale)")
    logit_mean: float = Field(0.0, description="logit_normal: mean of the normal")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: standard deviation of the normal")
    mode_scale: float = Field(1.29, description="mode: how far u is pulled towards the middle (0: uniform)")
    shift: float | Literal["resolution"] | None = Field(
        None, description="static shift (> 0; 1: none), resolution (Flux's dynamic shifting), or null: the family's "
                          "(sd3: 3.0; flux: resolution), or a pretrained model's own scheduler's")
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="loss weight per sample: none, sigma_sqrt (σ^-2) or cosmap (SD3's)")

    @field_validator("shift")
    @classmethod
    def _positive(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float) and value <= 0:
            raise ValueError("must be above 0 (1.0 is no shift), resolution or null")
        return value


SAMPLE_METRIC_NAMES = {  # train.sample_metric: the numbers each one logs, any of which train.keep_best can follow
    "adherence": ("adherence", "colour_accuracy", "shape_accuracy"),
    "label_adherence": ("label_adherence",),
    "clip_score": ("clip_score",),
}


class KeepBestParams(Section):
    """Which sample step's model train exports (pipeline/training/best.py)."""

    metric: str = Field(description="a number train.sample_metric logs (e.g. adherence, clip_score); never the "
                                    "training loss")
    mode: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower is better")


class MaskedLossParams(Section):
    """The loss weighted by each image's mask (preprocess.masks), at latent resolution: weight
    unmasked_weight + (1 - unmasked_weight) * mask per latent pixel; images without a mask weigh 1 everywhere."""

    enabled: bool = Field(False, description="weight the training loss by the images' masks")
    unmasked_weight: float = Field(0.0, ge=0, le=1, description="the weight outside the mask (0: the background is "
                                                                "ignored; 1: the plain loss)")
    normalize_by_area: bool = Field(False, description="each sample's loss is sum(w * error) / sum(w), so a small "
                                                       "subject weighs as much as a large one; off: mean(w * error)")


class TrainParams(Section):
    """Training the denoiser (pipeline/stages/train.py)."""

    steps: int = Field(1500, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="images per micro-batch on each process")
    learning_rate: float = Field(1e-3, gt=0, description="peak learning rate (AdamW), reached after warmup_steps")
    warmup_steps: int = Field(100, ge=0, description="optimizer steps of linear warm-up from 0")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global norm")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="share of empty captions: the unconditional branch "
                                                                "of classifier-free guidance")
    random_flip: bool = Field(False, description="mirror half the samples (needs encode.mirrored)")
    tokenizer_vocab_size: int = Field(1000, ge=600, description="the 512 byte-level symbols and 2 specials, plus whole-word tokens")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="no (fp32), fp16 or bf16 autocast (GPU); frozen weights are stored in it")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr_schedule: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="after the warm-up: cosine or linear decay to 0, or constant")
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="DDPM's target (sd, sdxl): the noise or v; flow families predict the velocity")
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR-gamma loss weighting (sd, sdxl); null: off")
    flow: FlowParams = Field(FlowParams(), description="flow matching (sd3, flux, chroma, zimage)")
    noise_offset: float = Field(0.0, ge=0, description="std of a per-channel constant added to the noise; e.g. 0.05 "
                                                       "for very dark or bright images")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the denoiser weights; null: off")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                                            "memory, more compute")
    attention: Literal["sdpa", "classic"] = Field(
        "sdpa", description="sdpa: torch's scaled_dot_product_attention; classic: diffusers' AttnProcessor")
    compile: bool = Field(False, description="torch.compile the UNet (GPU lever; minutes of compiling first)")
    channels_last: bool = Field(False, description="the UNet's weights and activations in NHWC (GPU lever)")
    tf32: bool = Field(False, description="fp32 matmuls on tensor cores (CUDA only)")
    optimizer: Literal["adamw", "adamw_8bit", "prodigy"] = Field(
        "adamw", description="adamw, adamw_8bit (bitsandbytes, CUDA) or prodigy (prodigyopt: estimates the step size "
                             "itself; learning_rate scales it, 1.0 recommended)")
    log_every: int = Field(50, ge=1, description="steps between logs of loss, lr, grad norm, images/s and memory")
    validate_every: int = Field(250, ge=1, description="held-out loss at fixed timesteps every this many steps")
    validation_timesteps: TrainingTimesteps = Field((100, 500, 900), description="timesteps of the held-out loss, "
                                                    "0 (clean) to 999 (noise); flow families: σ = t / 1000")
    validation_samples: int = Field(1024, ge=1, description="the held-out loss's samples: the validation split's "
                                    "first this many, the same every time (evaluate uses them all)")
    sample_every: int = Field(500, ge=0, description="sample grid to MLflow every this many steps; 0: off")
    sample_steps: int = Field(25, ge=1, description="sampler steps of each sample grid image (and of the sample "
                                                    "metric's images)")
    validation_prompts: list[str] = Field([], description="prompts of the sample grid, {trigger} replaced by "
                                          "ingest.trigger, beside the base model's column; []: the first "
                                          "validation captions, no base column")
    validation_seeds: list[int] = Field([0], min_length=1, description="each validation prompt is sampled once per "
                                                                      "seed")
    sample_metric: Literal["adherence", "label_adherence", "clip_score"] | None = Field(
        None, description="scored on the sample grid's images at each sample step and logged: adherence (synthetic "
                          "shapes), label_adherence, clip_score (evaluate.clip_model); null: none")
    keep_best: KeepBestParams | None = Field(None, description="export the model of the best sample step by this "
                                                               "metric, not the last step's; null: the last step's")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after this many sample steps with no "
                                                "improvement of keep_best's metric; null: never")
    checkpoint_every: int = Field(250, ge=1, description="steps between resumable checkpoints (models/checkpoints/)")
    checkpoints_kept: int = Field(2, ge=1, description="the newest checkpoints kept; older ones are deleted")
    seed: int = Field(0, description="seeds the initial weights, batches, noise and caption dropout")
    prior: PriorParams = Field(PriorParams(), description="prior preservation (docs/guides/training.md)")
    masked_loss: MaskedLossParams = Field(MaskedLossParams(), description="the loss weighted by the images' masks "
                                                                          "(docs/guides/training.md)")

    @model_validator(mode="after")
    def _keep_best_follows_a_sample_metric(self) -> TrainParams:
        if self.early_stopping_patience is not None and self.keep_best is None:
            raise PydanticCustomError("missing_setting", "train.early_stopping_patience: needs train.keep_best "
                                      "(the metric whose improvement it waits for)")
        if self.keep_best is None:
            return self
        if self.keep_best.metric in ("train_loss", "loss", "final_loss"):
            raise PydanticCustomError("conflicting_setting", "train.keep_best.metric: the training loss is too noisy to "
                                      "choose a model by; name a number train.sample_metric logs")
        if self.sample_metric is None or self.sample_every == 0:
            raise PydanticCustomError("missing_setting", "train.keep_best: needs train.sample_metric and "
                                      "train.sample_every > 0 (the steps whose samples it compares)")
        names = SAMPLE_METRIC_NAMES[self.sample_metric]
        if self.keep_best.metric not in names:
            raise PydanticCustomError("conflicting_setting", "train.keep_best.metric: '{metric}' is not logged by "
                                      "train.sample_metric {sample_metric}, which logs {names}",
                                      dict(metric=self.keep_best.metric, sample_metric=self.sample_metric,
                                           names=", ".join(names)))
        return self


class EvaluateParams(Section):
    """Fixed-seed metrics and sample grids of the trained model (pipeline/stages/evaluate.py)."""

    timesteps: TrainingTimesteps = Field((50, 250, 500, 750, 950), description="timesteps of the noise metrics, "
                                         "0 (clean) to 999 (noise); flow families: σ = t / 1000")
    noise_seed: int = Field(0, description="seeds the noise metrics' noise")
    samples_per_prompt: int = Field(4, ge=1, description="images generated per prompt and seed set")
    sample_seed: int = Field(0, description="seed of the first seed set of generated samples")
    stability_repeats: int = Field(3, ge=1, description="sample-based metrics over this many seed sets")
    num_inference_steps: int = Field(25, ge=1, description="sampler steps per generated image")
    guidance_scale: float = Field(4.0, ge=1, description="classifier-free guidance of the samples (1: none)")
    inception_weights: str | None = Field(None, description="TorchScript FID Inception file for FID/KID")
    kid_subset_size: int = Field(50, ge=2, description="capped at the number of samples per seed set")
    clip_model: str | None = Field(None, description="CLIP folder or cached hub id for the CLIP score")
    prompts: str | None = Field(None, description="file of prompts, one a line, relative to the project root")
    max_prompts: int = Field(12, ge=1, description="prompts drawn from the validation captions")
    max_labels: int = Field(50, ge=2, description="captions are labels when at most this many distinct ...")
    min_images_per_label: int = Field(5, ge=1, description="... each on at least this many training images")
    classifier_resolution: int = Field(16, ge=2, description="side of the pixels the label classifier reads")
    classifier_images_per_label: int = Field(500, ge=1, description="training images per label it is fit on")


class RegisterParams(Section):
    """MLflow: where runs are tracked, the registered model, and the gate that moves its champion alias."""

    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow's tracking URI (a relative sqlite path is "
                                                                 "under the project root); MLFLOW_TRACKING_URI wins")
    experiment: str = Field("sdpipe", description="MLflow experiment of the runs")
    model_name: str = Field("sdpipe", description="registered model name")
    gate_metric: str = Field("auto", description="auto: the data's metric (docs/guides/evaluation.md), or an eval.json name")
    gate_direction: Literal["auto", "maximize", "minimize"] = Field(
        "auto", description="auto (with gate_metric auto, or from a named metric), maximize or minimize")
    min_improvement: float = Field(0.0, ge=0, description="a version becomes champion when its gate metric beats "
                                                          "the champion's by more than this")
    min_classifier_accuracy: float = Field(0.8, ge=0, le=1, description="label adherence gates only when its "
                                           "classifier reads real images this well")

    @model_validator(mode="after")
    def _auto_metric_has_its_own_direction(self) -> RegisterParams:
        if self.gate_metric == "auto" and self.gate_direction != "auto":
            raise PydanticCustomError("conflicting_setting", "register.gate_direction: must be auto when "
                                      "register.gate_metric is auto (each data's metric has its direction); name a "
                                      "metric to choose the direction", {})
        return self


class MonitorParams(Section):
    """When new batches in `incoming` make retraining worthwhile (see pipeline/monitor.py)."""

    incoming: str = Field("data/incoming", description="folder of new batches, one sub-folder each (images + "
                                                       "metadata.jsonl), relative to the project root")
    min_new_samples: int = Field(100, ge=1, description="valid new samples needed before any retraining")
    psi_threshold: float = Field(0.25, gt=0, description="a feature drifts above this PSI ...")
    ks_alpha: float = Field(0.01, gt=0, lt=1, description="... when its KS p-value is also below this")
    mmd_alpha: float = Field(0.01, gt=0, lt=1, description="latents drift when the MMD p-value is below this")
    mmd_permutations: int = Field(200, ge=20, description="permutations of the latent MMD test")
    reference_samples: int = Field(300, ge=10, description="training images the batch latents are compared to")
    max_degradation: float = Field(0.25, ge=0, description="allowed rise of the champion's noise MSE on new data")
    retrain_cron: str = Field("0 3 * * *", description="the retrain deployment's schedule: a cron expression "
                                                       "(minute hour day-of-month month day-of-week) or @daily ...")
    stage_retries: int = Field(1, ge=0, description="retries of a failed stage in the training flow")
    seed: int = Field(0, description="seeds the reference sample and the MMD permutations")

    @field_validator("retrain_cron")
    @classmethod
    def _is_a_cron_expression(cls, value: str) -> str:
        problem = cron_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class RayParams(Section):
    """Where the data stages' per-image work runs (pipeline/runtime/ray_tasks.py); no setting changes an output."""

    address: str | None = Field(None, description="an existing cluster (ray://... or host:port); "
                                                  "null: RAY_ADDRESS, else Ray started in-process")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the in-process Ray; null: all of this machine's")
    min_tasks: int = Field(8, ge=1, description="a stage with fewer tasks (shards) runs them in its own process "
                                                "without starting Ray, unless a cluster is set; 1: always Ray")


class Params(Section):
    """params.yaml: one section per stage, and the model, monitor and ray settings they share."""

    ingest: IngestParams = IngestParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    preprocess: PreprocessParams = PreprocessParams()
    vae: VaeParams = VaeParams()
    encode: EncodeParams = EncodeParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    register_: RegisterParams = Field(RegisterParams(), alias="register")
    monitor: MonitorParams = MonitorParams()
    ray: RayParams = RayParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())

    @model_validator(mode="after")
    def _random_flip_has_mirrored_latents(self) -> Params:
        if self.train.random_flip and not self.encode.mirrored:
            raise PydanticCustomError(
                "conflicting_setting", "train.random_flip: needs the mirror images' latents; set encode.mirrored: "
                "true (encode caches them) or train.random_flip: false", {})
        return self

    @model_validator(mode="after")
    def _masked_loss_has_masks(self) -> Params:
        if self.train.masked_loss.enabled and not self.preprocess.masks:
            raise PydanticCustomError(
                "missing_setting", "train.masked_loss.enabled: needs the images' masks; set preprocess.masks: true "
                "(preprocess keeps each image's alpha channel) or train.masked_loss.enabled: false", {})
        return self

    @model_validator(mode="after")
    def _validation_prompts_have_their_trigger(self) -> Params:
        if self.ingest.trigger is None and any(TRIGGER in prompt for prompt in self.train.validation_prompts):
            raise PydanticCustomError("missing_setting", "train.validation_prompts: names {trigger}, which needs "
                                      "ingest.trigger (the word that names the subject)", {"trigger": TRIGGER})
        return self

    @model_validator(mode="after")
    def _resolution_fits_the_latent_patches(self) -> Params:
        """The VAE divides the side by its downsampling and a transformer family packs 2x2 latent patches:
        a side that does not divide fails as a tensor-shape error inside the vae or train stage."""
        if self.model.mode == "finetune":
            downsampling, vae = PRETRAINED_VAE_DOWNSAMPLING, "the pretrained VAE downsamples by 8"
        else:
            levels = len(self.vae.block_out_channels)
            downsampling = 2 ** (levels - 1)
            vae = f"vae.block_out_channels' {levels} levels downsample by {downsampling}"
        patch = FAMILY_DECLARATIONS[self.model.family].patch
        multiple = downsampling * patch
        patches = f" and model.family {self.model.family} takes {patch}x{patch} latent patches" if patch > 1 else ""
        for key, value in (("resolution", self.preprocess.resolution),
                           *((("bucket_step", self.preprocess.bucket_step),) if self.preprocess.bucketing else ())):
            if value % multiple:
                raise PydanticCustomError(
                    "conflicting_setting", "preprocess.{key}: must be a multiple of {multiple}: {vae}{patches} "
                    "(got {value})", {"key": key, "multiple": multiple, "vae": vae, "patches": patches, "value": value})
        return self

    @model_validator(mode="after")
    def _lora_exports_have_a_layout(self) -> Params:
        lora = self.model.lora
        if "kohya" in lora.export and not FAMILY_DECLARATIONS[self.model.family].kohya_lora:
            kohya_families = [name for name, declared in FAMILY_DECLARATIONS.items() if declared.kohya_lora]
            raise PydanticCustomError(
                "conflicting_setting", "model.lora.export: kohya has no key layout for model.family {family} here "
                "(written for {families}): leave model.lora.export at [diffusers]",
                {"family": self.model.family, "families": ", ".join(kohya_families)})
        if "kohya" in lora.export and lora.use_dora:
            raise PydanticCustomError(
                "conflicting_setting", "model.lora.export: kohya with model.lora.use_dora: diffusers drops a kohya "
                "file's DoRA magnitudes (dora_scale) when loading it; export only diffusers for a DoRA run", {})
        return self

    @model_validator(mode="after")
    def _prior_has_what_it_needs(self) -> Params:
        check_prior_fits(self.train.prior, self.ingest, self.model.mode, self.model.finetune)
        return self

    @model_validator(mode="after")
    def _prodigy_learning_rate_is_a_multiplier(self) -> Params:
        """Prodigy estimates the step size; its lr multiplies that estimate. AdamW's 1e-3 would train 1000x slower
        than Prodigy means to, with no error, so a learning rate far from 1.0 is refused rather than warned of."""
        rate = self.train.learning_rate
        if self.train.optimizer == "prodigy" and not PRODIGY_LEARNING_RATES[0] <= rate <= PRODIGY_LEARNING_RATES[1]:
            raise PydanticCustomError(
                "conflicting_setting", "train.learning_rate: {rate} with train.optimizer prodigy, which estimates the "
                "step size itself and multiplies it by the learning rate: set 1.0 (from {low} to {high} accepted)",
                {"rate": rate, "low": PRODIGY_LEARNING_RATES[0], "high": PRODIGY_LEARNING_RATES[1]})
        return self

    @model_validator(mode="after")
    def _ddpm_settings_are_not_set_for_flow_matching(self) -> Params:
        if FAMILY_DECLARATIONS[self.model.family].flow:
            if self.train.snr_gamma is not None:
                raise PydanticCustomError(
                    "conflicting_setting", "train.snr_gamma: min-SNR weighting is DDPM's (sd, sdxl); model.family "
                    "{family} trains by flow matching, weighted by train.flow.weighting: set snr_gamma to null",
                    {"family": self.model.family})
            if self.train.prediction_type != "epsilon":
                raise PydanticCustomError(
                    "conflicting_setting", "train.prediction_type: {kind} is a DDPM target; model.family {family} "
                    "predicts the flow's velocity: leave prediction_type at epsilon",
                    {"kind": self.train.prediction_type, "family": self.model.family})
        return self


