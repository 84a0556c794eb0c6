"""Typed parameters: every section of params.yaml, its keys, defaults and checks (the ingest section and its
sources are in pipeline.core.source_params).

Every stage receives a validated `Params` object (pipeline.core.params_file reads it). An unknown or
mistyped key fails with a message that names the key (for example `params.yaml: train.lerning_rate:
unknown key`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.core.section import Section
from pipeline.core.source_params import SOURCES, IngestParams


class ConfigError(ValueError):
    """A parameter file that cannot be used, with the offending key in the message."""


class ValidateParams(Section):
    """Thresholds of the validation suite (pipeline/stages/validate.py); hard checks fail the stage, soft ones
    quarantine the row."""

    # hard
    min_rows: int = Field(10, ge=1, description="fewer rows fails the stage")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="more quarantined rows fails the stage")
    max_empty_caption_share: dict[str, float] = Field(
        {"default": 0.0}, description="share of rows without a caption allowed, per source; 'default' for others")
    # soft
    min_caption_length: int = Field(1, ge=1)
    max_caption_length: int = Field(1000, ge=1)
    min_width: int = Field(16, ge=1)
    min_height: int = Field(16, ge=1)
    max_width: int = Field(8192, ge=1)
    max_height: int = Field(8192, ge=1)
    # At most Pillow's own limit, which preprocess decodes under.
    max_pixels: int = Field(50_000_000, ge=1, le=89_478_485, description="larger headers are refused before decoding")
    min_aspect_ratio: float = Field(0.25, gt=0, description="width / height")
    max_aspect_ratio: float = Field(4.0, gt=0)
    allowed_formats: tuple[str, ...] = ("png", "jpeg", "mpo", "webp", "bmp", "gif", "tiff")
    allowed_modes: tuple[str, ...] = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr",
                                      "I;16", "I;16B", "I;16L", "I")
    max_near_duplicate_distance: int = Field(4, ge=-1, le=64, description="dHash bits; -1 turns the check off")
    max_near_duplicate_colour_difference: float = Field(
        15.0, ge=0, le=255, description="a dHash candidate is a near-duplicate only if no cell of a 24×24 colour "
        "grid of either image lies further than this (0-255) outside the colours around it in the other")
    near_duplicate_min_side: int = Field(64, ge=9, description="smaller images are too small to hash reliably")
    min_contrast: float = Field(3.0, ge=0, description="largest colour-channel standard deviation; below it is blank")
    min_brightness: float = Field(4.0, ge=0, le=255)
    max_brightness: float = Field(252.0, ge=0, le=255)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, values: object) -> object:
        if isinstance(values, dict) and "allow_empty_captions" in values:
            raise PydanticCustomError(
                "renamed_key", "validate.allow_empty_captions: replaced by validate.max_empty_caption_share "
                "(for example {folder: 0.3}: the share of a source's rows that may have no caption)", {})
        return values

    @field_validator("max_empty_caption_share")
    @classmethod
    def _shares_per_source(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - {"default", *SOURCES})
        if unknown:
            raise ValueError(f"unknown source {unknown}: use default or one of {', '.join(SOURCES)}")
        if not all(0 <= share <= 1 for share in value.values()):
            raise ValueError("each share must be between 0 and 1")
        return {"default": 0.0} | value

    def empty_caption_share(self, source: str) -> float:
        return self.max_empty_caption_share.get(source, self.max_empty_caption_share["default"])


class PreprocessParams(Section):
    resolution: int = Field(32, ge=8)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    crop: Literal["center", "random"] = Field(
        "center", description="random: one crop per sample, fixed by its id and `seed`, so re-runs agree")
    seed: int = Field(0, description="seeds the random crops")
    lowercase_captions: bool = False
    bucketing: bool = Field(False, description="train images keep their aspect ratio in buckets; val stays square")
    bucket_step: int = Field(8, ge=8, description="bucket sides are multiples of this; 64 for Stable Diffusion UNets")
    max_bucket_ratio: float = Field(2.0, ge=1, description="the most elongated bucket, long side / short side")

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
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int | None = Field(None, ge=1, description="null: the family's (sd, sdxl: 4; sd3, flux: 16)")
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    seed: int = 0


class EncodeParams(Section):
    batch_size: int = Field(256, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="the frozen encoders run and their cached outputs are stored in this dtype")


class LoraParams(Section):
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] | None = Field(
        None, min_length=1, description="denoiser layers that get LoRA layers; null: the family's default")
    quantize_base: Literal["int8"] | None = Field(
        None, description="int8: the frozen denoiser's linear weights stored in int8 while training (torchao "
                          "weight-only); the saved model fuses the LoRA layers into the full-precision base")


# The scratch presets of each family that is built (pipeline/diffusion/families/; a test checks they agree).
FAMILY_PRESETS = {"sd": ("tiny", "small", "sd15"), "sdxl": ("tiny", "sdxl"),
                  "sd3": ("tiny", "sd35_medium", "sd35_large"), "flux": ("tiny", "flux_dev", "flux_schnell")}
FAMILIES = tuple(FAMILY_PRESETS)
FLOW_FAMILIES = ("sd3", "flux")  # trained by flow matching, with a 16-channel VAE whose latents are shifted
FAMILY_LATENT_CHANNELS = {"sd": 4, "sdxl": 4, "sd3": 16, "flux": 16}


def latent_channels_of(vae: VaeParams, family: str) -> int:
    """The scratch VAE's latent channels: vae.latent_channels, else the family's."""
    return vae.latent_channels or FAMILY_LATENT_CHANNELS[family]


class ModelParams(Section):
    family: Literal[FAMILIES] = Field("sd", description="the architecture (README \"Model families\")")
    mode: Literal["scratch", "finetune"] = "scratch"
    preset: str = Field("tiny", description="scratch mode: the model sizes, one of the family's presets")
    pretrained: str | None = Field(None, description="finetune mode: a diffusers folder or a hub id")
    finetune: Literal["lora", "full"] = Field("lora", description="finetune mode: LoRA layers or the whole denoiser")
    max_sequence_length: int = Field(77, ge=1, description="sd3, flux: T5 tokens per caption (truncated or padded to "
                                                          "it) in training, the encode cache and sampling")
    lora: LoraParams = LoraParams()

    @model_validator(mode="after")
    def _finetune_names_its_model(self) -> ModelParams:
        if self.mode == "finetune" and not self.pretrained:
            raise PydanticCustomError(
                "missing_setting",
                "model.pretrained: required when model.mode is finetune (a diffusers folder or a hub id)", {})
        return self

    @model_validator(mode="after")
    def _family_has_the_preset(self) -> ModelParams:
        if self.preset not in FAMILY_PRESETS[self.family]:
            raise PydanticCustomError(
                "missing_setting", "model.preset: '{preset}' is not a preset of model.family {family} ({presets})",
                {"preset": self.preset, "family": self.family, "presets": ", ".join(FAMILY_PRESETS[self.family])})
        return self


class FlowParams(Section):
    """Flow matching (sd3, flux; pipeline/diffusion/flow_matching.py): how σ is drawn, shifted and weighted."""

    sampling: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    shift: float | Literal["resolution"] | None = Field(
        None, description="static shift (> 0; 1: none), resolution (Flux's dynamic shifting), or null: the family's "
                          "(sd3: 3.0; flux: resolution), or a pretrained model's own scheduler's")
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"

    @field_validator("shift")
    @classmethod
    def _positive(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float) and value <= 0:
            raise ValueError("must be above 0 (1.0 is no shift), resolution or null")
        return value


class TrainParams(Section):
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    random_flip: bool = Field(False, description="mirror half the samples; encode caches both orientations")
    tokenizer_vocab_size: int = Field(1000, ge=600, description="the 512 byte-level symbols and 2 specials, plus whole-word tokens")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_schedule: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR-gamma loss weighting (sd, sdxl); null: off")
    flow: FlowParams = FlowParams()
    noise_offset: float = Field(0.0, ge=0)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the denoiser weights; null: off")
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "classic"] = "sdpa"
    compile: bool = Field(False, description="torch.compile the UNet (GPU lever; minutes of compiling first)")
    channels_last: bool = Field(False, description="the UNet's weights and activations in NHWC (GPU lever)")
    tf32: bool = Field(False, description="fp32 matmuls on tensor cores (CUDA only)")
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    log_every: int = Field(50, ge=1)
    validate_every: int = Field(250, ge=1, description="held-out loss at fixed timesteps every this many steps")
    validation_timesteps: tuple[int, ...] = (100, 500, 900)
    validation_samples: int = Field(1024, ge=1, description="the held-out loss's samples: the validation split's "
                                    "first this many, the same every time (evaluate uses them all)")
    sample_every: int = Field(0, ge=0, description="sample grid to MLflow every this many steps; 0: off")
    checkpoint_every: int = Field(250, ge=1)
    checkpoints_kept: int = Field(2, ge=1)
    seed: int = 0


class EvaluateParams(Section):
    timesteps: tuple[int, ...] = (50, 250, 500, 750, 950)
    noise_seed: int = 0
    samples_per_prompt: int = Field(4, ge=1)
    sample_seed: int = 0
    stability_repeats: int = Field(3, ge=1, description="sample-based metrics over this many seed sets")
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(4.0, ge=1)
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
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "sdpipe"
    model_name: str = "sdpipe"
    gate_metric: str = Field("auto", description="auto: the data's metric (README \"Evaluation\"), or an eval.json name")
    gate_direction: Literal["auto", "maximize", "minimize"] = "auto"
    min_improvement: float = Field(0.0, ge=0)
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

    incoming: str = "data/incoming"
    min_new_samples: int = Field(100, ge=1, description="valid new samples needed before any retraining")
    psi_threshold: float = Field(0.25, gt=0, description="a feature drifts above this PSI ...")
    ks_alpha: float = Field(0.01, gt=0, lt=1, description="... when its KS p-value is also below this")
    mmd_alpha: float = Field(0.01, gt=0, lt=1, description="latents drift when the MMD p-value is below this")
    mmd_permutations: int = Field(200, ge=20)
    reference_samples: int = Field(300, ge=10, description="training images the batch latents are compared to")
    max_degradation: float = Field(0.25, ge=0, description="allowed rise of the champion's noise MSE on new data")
    retrain_cron: str = "0 3 * * *"
    stage_retries: int = Field(1, ge=0, description="retries of a failed stage in the training flow")
    seed: int = 0


class RayParams(Section):
    """Where the data stages' per-image work runs (pipeline/runtime/ray_tasks.py); no setting changes an output."""

    address: str | None = Field(None, description="an existing cluster (ray://... or host:port); "
                                                  "null: RAY_ADDRESS, else Ray started in-process")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the in-process Ray; null: all of this machine's")
    min_tasks: int = Field(8, ge=1, description="a stage with fewer tasks (shards) runs them in its own process "
                                                "without starting Ray, unless a cluster is set; 1: always Ray")


class Params(Section):
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
    def _ddpm_settings_are_not_set_for_flow_matching(self) -> Params:
        if self.model.family in FLOW_FAMILIES:
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


