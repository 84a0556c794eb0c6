"""The model a training run trains: its modules (VAE, tokenizer, text encoder, UNet, noise schedule), built
from scratch at a size preset or loaded from a pretrained model (whole UNet or LoRA layers on it), and what
turns them into a pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor
from diffusers.training_utils import EMAModel, cast_training_params
from peft import LoraConfig

from pipeline.contracts.latents import CachedLatents, MappedRows
from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError, ModelParams, TrainParams
from pipeline.diffusion.components import (
    PRESETS,
    build_text_encoder,
    build_unet,
    load_frozen_text_encoder,
    load_pretrained_unet,
    pretrained_scheduler_config,
)
from pipeline.diffusion.schedule import sampling_scheduler, training_scheduler
from pipeline.diffusion.tokenizer import build_tokenizer

WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Model:
    """The modules being trained and what turns them into a pipeline."""

    vae: AutoencoderKL
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: DDPMScheduler  # the training noise schedule, with the prediction type
    trains_text_encoder: bool  # scratch: yes; finetune: frozen, its outputs come from the encode cache
    lora: bool

    def condition(self, conditioning: torch.Tensor) -> torch.Tensor:
        """The UNet's cross-attention states: from the text encoder, or already computed by encode."""
        return self.text_encoder(conditioning)[0] if self.trains_text_encoder else conditioning.float()

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.text_encoder] if self.trains_text_encoder else [self.unet]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.trained_modules() for p in module.parameters() if p.requires_grad]

    def pipeline(self, accelerator: Accelerator) -> StableDiffusionPipeline:
        pipeline = StableDiffusionPipeline(
            vae=self.vae, text_encoder=accelerator.unwrap_model(self.text_encoder), tokenizer=self.tokenizer,
            unet=accelerator.unwrap_model(self.unet), scheduler=sampling_scheduler(self.scheduler),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


def scratch_model(model: ModelParams, train: TrainParams, paths: Paths, cache: CachedLatents,
                  latents: MappedRows) -> Model:
    """A tokenizer from the training captions; text encoder and UNet of the preset's sizes, both trained."""
    settings, preset = train, PRESETS[model.preset]
    tokenizer = build_tokenizer(cache.captions, vocab_size=settings.tokenizer_vocab_size, max_tokens=preset.max_tokens)
    unet = build_unet(preset, latent_channels=latents.shape[1], latent_size=latents.shape[-1])
    return Model(AutoencoderKL.from_pretrained(paths.vae_model), tokenizer, build_text_encoder(tokenizer, preset),
                 unet, training_scheduler(settings.prediction_type), trains_text_encoder=True, lora=False)


def pretrained_model(model: ModelParams, train: TrainParams, paths: Paths, cache: CachedLatents,
                     latents: MappedRows) -> Model:
    """The pretrained UNet (whole, or frozen under LoRA layers) conditioned on the cached frozen text states."""
    spec, lora = model.pretrained, model.finetune == "lora"
    if cache.text_states is None:
        raise ValueError(f"train: {paths.latents} holds no text-encoder states; run `sdpipe encode` with "
                         "model.mode: finetune (dvc repro does)")
    tokenizer, text_encoder = load_frozen_text_encoder(spec, paths.root)
    unet = load_pretrained_unet(spec, paths.root)
    if unet.config.in_channels != latents.shape[1]:
        raise ValueError(f"train: the UNet of {spec} takes {unet.config.in_channels} latent channels but models/vae "
                         f"gives {latents.shape[1]}: the VAE must come from the same model (rerun the vae stage)")
    # a model fine-tuned at one resolution generates at it by default
    unet.register_to_config(sample_size=latents.shape[-1])
    if lora:
        unet.requires_grad_(False)
        settings = model.lora
        try:
            unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                        init_lora_weights="gaussian", target_modules=list(settings.target_modules)))
        except ValueError as error:
            raise ConfigError(f"model.lora.target_modules: {error}") from None
    scheduler = training_scheduler(train.prediction_type, pretrained_scheduler_config(spec, paths.root))
    return Model(AutoencoderKL.from_pretrained(paths.vae_model), tokenizer, text_encoder, unet, scheduler,
                 trains_text_encoder=False, lora=lora)


def build_model(model: ModelParams, train: TrainParams, paths: Paths, cache: CachedLatents,
                val: CachedLatents) -> Model:
    latents = val.single_size().mean  # the square resolution the model generates at
    build = pretrained_model if model.mode == "finetune" else scratch_model
    built = build(model, train, paths, cache, latents)
    if train.attention == "classic":
        built.unet.set_attn_processor(AttnProcessor())
    if train.gradient_checkpointing:
        built.unet.enable_gradient_checkpointing()
        if built.trains_text_encoder:
            built.text_encoder.gradient_checkpointing_enable()
    if train.random_flip and not cache.flipped:
        raise ValueError(f"train: train.random_flip is on but {paths.latents} has no mirrored latents; "
                         "run `sdpipe encode` again (dvc repro does)")
    return built


def place_frozen_modules(model: Model, device: torch.device, dtype: torch.dtype) -> None:
    """Frozen weights in the weight dtype, as diffusers' training scripts keep them: the VAE (validation samples
    only), the finetune text encoder, and under LoRA the base UNet; trained parameters stay in fp32."""
    model.vae.to(device, dtype)
    if not model.trains_text_encoder:
        model.text_encoder.to(device, dtype)
    if model.lora:
        model.unet.to(device, dtype)
        cast_training_params(model.unet, dtype=torch.float32)


def stored_frozen_modules(model: Model, settings: ModelParams, paths: Paths) -> None:
    """The frozen modules as stored (fp32), for the saved model: a round trip through bf16 would change them."""
    model.vae = AutoencoderKL.from_pretrained(paths.vae_model)
    if not model.trains_text_encoder:
        model.text_encoder = load_frozen_text_encoder(settings.pretrained, paths.root)[1]


def make_optimizer(parameters: list, settings: TrainParams, device: torch.device):
    if settings.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError("train.optimizer: adamw_8bit needs bitsandbytes (pip install bitsandbytes)") from None
        if device.type != "cuda":
            raise ConfigError("train.optimizer: adamw_8bit needs a CUDA GPU; use adamw on this machine")
        return bitsandbytes.optim.AdamW8bit(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    # fused: one kernel for all parameters; on CPUs the default per-tensor path costs ~20% of a tiny model's step
    return torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=True)


def trained_unet_parameters(accelerator: Accelerator, unet) -> list[torch.nn.Parameter]:
    """The UNet's trained parameters (the LoRA layers in LoRA mode): what the EMA tracks."""
    return [p for p in accelerator.unwrap_model(unet).parameters() if p.requires_grad]


class EmaWeights:
    """Swap the EMA weights into the parameters for the duration of the block."""

    def __init__(self, ema: EMAModel, parameters: list[torch.nn.Parameter]):
        self.ema, self.parameters = ema, parameters

    def __enter__(self):
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)

    def __exit__(self, *_):
        self.ema.restore(self.parameters)
