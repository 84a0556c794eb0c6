"""The model a training run trains: its modules (VAE, tokenizers, text encoders, denoiser, objective) for the
chosen family (`model.family`), built from scratch at a size preset or loaded from a pretrained model (whole
denoiser or LoRA layers on it), and what turns them into the family's pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.models.attention_processor import AttnProcessor
from diffusers.training_utils import EMAModel, cast_training_params
from peft import LoraConfig

from pipeline.contracts.latents import CachedLatents, MappedRows
from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError, LoraParams, ModelParams, TrainParams
from pipeline.diffusion.components import pretrained_scheduler_config
from pipeline.diffusion.families import check_pretrained_family, family_named
from pipeline.diffusion.families.base import Family, Scratch

WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Model:
    """The modules being trained and what turns them into a pipeline."""

    family: Family
    vae: ModelMixin  # the family's latent space's VAE class
    text: dict[str, object]  # the tokenizers and text encoders (finetune: None), by pipeline component name
    denoiser: torch.nn.Module
    objective: object  # schedule.Ddpm or flow_matching.FlowMatching, with the prediction type
    trains_text_encoder: bool  # scratch: yes; finetune: frozen, their outputs come from the encode cache
    lora: bool

    def text_encoders(self) -> list[torch.nn.Module]:
        return self.family.text_encoders(self.text)

    def denoiser_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents in the denoiser's space, normalised by models/vae's statistics (the family's latent space)."""
        return self.family.latent_space.to_denoiser(latents, self.vae)

    def condition(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The denoiser's text conditioning: from the text encoders (token ids), or already computed by encode."""
        if self.trains_text_encoder:
            return self.family.encode_text(self.text, conditioning)
        return {name: value.float() for name, value in conditioning.items()}

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.denoiser, *self.text_encoders()] if self.trains_text_encoder else [self.denoiser]

    def replace_trained_modules(self, modules: list[torch.nn.Module]) -> None:
        """Put back the trained modules (as accelerate.prepare wrapped them), in trained_modules' order."""
        self.denoiser = modules[0]
        for part, module in zip(self.family.text if self.trains_text_encoder else (), modules[1:], strict=True):
            self.text[part.encoder] = module

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.trained_modules() for p in module.parameters() if p.requires_grad]

    def pipeline(self, accelerator: Accelerator) -> DiffusionPipeline:
        """The family's pipeline of the modules in memory (in finetune mode without text encoders: train conditions
        on the cached states)."""
        return self.family.pipeline({**self.text, **self.trained_components(accelerator), "vae": self.vae})

    def trained_components(self, accelerator: Accelerator) -> dict[str, object]:
        """The pipeline components this training made: the denoiser, the sampling scheduler and, in scratch mode,
        the tokenizers and text encoders."""
        text = {name: accelerator.unwrap_model(value) if isinstance(value, torch.nn.Module) else value
                for name, value in self.text.items()} if self.trains_text_encoder else {}
        return {**text, self.family.denoiser: accelerator.unwrap_model(self.denoiser),
                "scheduler": self.objective.sampling_scheduler()}


def frozen_vae(family: Family, train: TrainParams, paths: Paths) -> ModelMixin:
    """models/vae in the dtype it runs in: the weight dtype, or fp32 where the family's VAE gives NaNs in fp16."""
    dtype = torch.float32 if family.vae_in_fp32 else WEIGHT_DTYPES[train.mixed_precision]
    return family.latent_space.vae_class.from_pretrained(paths.vae_model, torch_dtype=dtype).requires_grad_(False)


def scratch_model(family: Family, model: ModelParams, train: TrainParams, paths: Paths, cache: CachedLatents,
                  latents: MappedRows) -> Model:
    """Tokenizers from the training captions; text encoders and denoiser of the preset's sizes, all trained."""
    components = family.scratch_components(Scratch(tuple(cache.captions), model.preset, train.tokenizer_vocab_size,
                                                    latents.shape[1], latents.shape[-1], model.max_sequence_length))
    denoiser = components.pop(family.denoiser)
    return Model(family, frozen_vae(family, train, paths), components, denoiser,
                 family.training_objective(train, None), trains_text_encoder=True, lora=False)


def pretrained_model(family: Family, model: ModelParams, train: TrainParams, paths: Paths, cache: CachedLatents,
                     latents: MappedRows) -> Model:
    """The pretrained denoiser (whole, or frozen under LoRA layers) conditioned on the cached frozen text states:
    the text encoders are never loaded here, only the tokenizers (a sampler reads T5's length from them). Under
    LoRA the base is read from its files in the weight dtype; a whole denoiser trains on fp32 master weights."""
    spec, lora = model.pretrained, model.finetune == "lora"
    if cache.text_states is None:
        raise ValueError(f"train: {paths.latents} holds no text-encoder states; run `sdpipe encode` with "
                         "model.mode: finetune (dvc repro does)")
    check_pretrained_family(spec, paths.root, family)
    text = {**family.load_tokenizers(spec, paths.root, model.max_sequence_length),
            **{part.encoder: None for part in family.text}}
    denoiser = family.load_denoiser(spec, paths.root,
                                    dtype=WEIGHT_DTYPES[train.mixed_precision] if lora else torch.float32)
    if family.denoiser_latent_channels(denoiser) != latents.shape[1]:
        raise ValueError(f"train: the {family.denoiser} of {spec} takes {family.denoiser_latent_channels(denoiser)} "
                         "latent channels "
                         f"but models/vae gives {latents.shape[1]}: the VAE must come from the same model (rerun the "
                         "vae stage)")
    # a model fine-tuned at one resolution generates at it by default
    denoiser.register_to_config(sample_size=latents.shape[-1])
    if lora:
        denoiser.requires_grad_(False)
        try:
            denoiser.add_adapter(lora_config(family, model.lora))
        except ValueError as error:
            raise ConfigError(f"model.lora.target_modules: {error}") from None
    objective = family.training_objective(train, pretrained_scheduler_config(spec, paths.root))
    return Model(family, frozen_vae(family, train, paths), text, denoiser, objective,
                 trains_text_encoder=False, lora=lora)


def lora_config(family: Family, settings: LoraParams) -> LoraConfig:
    """The LoRA (or DoRA) layers trained on the denoiser; the LoRA file carries them as its adapter metadata, so
    load_lora_weights rebuilds the same layers (alpha included)."""
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      init_lora_weights="gaussian", use_dora=settings.use_dora,
                      target_modules=list(settings.target_modules or family.lora_targets))


def build_model(model: ModelParams, train: TrainParams, paths: Paths, cache: CachedLatents,
                val: CachedLatents) -> Model:
    latents = val.single_size().mean  # the square resolution the model generates at
    build = pretrained_model if model.mode == "finetune" else scratch_model
    built = build(family_named(model.family), model, train, paths, cache, latents)
    if train.attention == "classic":
        built.denoiser.set_attn_processor(AttnProcessor())
    if train.gradient_checkpointing:
        built.denoiser.enable_gradient_checkpointing()
        if built.trains_text_encoder:
            for encoder in built.text_encoders():
                encoder.gradient_checkpointing_enable()
    if train.random_flip and not cache.flipped:
        raise ValueError(f"train: train.random_flip is on but {paths.latents} has no mirrored latents; "
                         "run `sdpipe encode` again (dvc repro does)")
    return built


def place_modules(model: Model, device: torch.device, dtype: torch.dtype, settings: ModelParams) -> None:
    """The trained modules on the device, and the frozen weights in the weight dtype they were loaded in, as
    diffusers' training scripts keep them: the VAE (validation samples only) and under LoRA the base denoiser, its
    linear weights in int8 if `model.lora.quantize_base` says so; trained parameters stay in fp32."""
    for module in model.trained_modules():
        module.to(device)
    model.vae.to(device)
    if model.lora:
        model.denoiser.to(device, dtype)
        cast_training_params(model.denoiser, dtype=torch.float32)
        if settings.lora.quantize_base == "int8":
            quantize_frozen_linears(model.denoiser)


def quantize_frozen_linears(denoiser: torch.nn.Module) -> None:
    """The frozen linear weights (the base layers under LoRA and every other linear) stored in int8 with a scale
    per output channel, dequantized at each matmul (torchao's weight-only int8): half their bf16 bytes. Done on
    the weights' device, after the move, so a large base is never quantized on the CPU."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError("model.lora.quantize_base: int8 needs torchao (pip install torchao; in this "
                          "repository `pip install -e '.[quantize]'`)") from None

    def frozen_linear(module: torch.nn.Module, _name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not module.weight.requires_grad

    quantize_(denoiser, Int8WeightOnlyConfig(), filter_fn=frozen_linear)


def stored_bytes(tensor: torch.Tensor) -> int:
    """A tensor's bytes in memory; a quantized one's (a torchao tensor subclass) are its inner tensors'."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def denoiser_weights_mb(denoiser: torch.nn.Module) -> float:
    return sum(stored_bytes(parameter) for parameter in denoiser.parameters()) / 2**20


def make_optimizer(parameters: list, settings: TrainParams, device: torch.device):
    if settings.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError("train.optimizer: adamw_8bit needs bitsandbytes (pip install bitsandbytes)") from None
        if device.type != "cuda":
            raise ConfigError("train.optimizer: adamw_8bit needs a CUDA GPU; use adamw on this machine")
        return bitsandbytes.optim.AdamW8bit(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if settings.optimizer == "prodigy":
        return prodigy(parameters, settings)
    # fused: one kernel for all parameters; on CPUs the default per-tensor path costs ~20% of a tiny model's step
    return torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=True)


def prodigy(parameters: list, settings: TrainParams):
    """Prodigy as its authors advise for diffusion models: AdamW-style decoupled weight decay, bias correction, and
    its step-size estimate held back during an LR warm-up (safeguard_warmup, which without a warm-up only slows
    the estimate's growth). Its estimate d and the sums behind it live in the param groups, so a checkpoint's
    optimizer state resumes it exactly."""
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ConfigError("train.optimizer: prodigy needs prodigyopt (pip install prodigyopt)") from None
    return Prodigy(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, decouple=True,
                   use_bias_correction=True, safeguard_warmup=settings.warmup_steps > 0)


def trained_denoiser_parameters(accelerator: Accelerator, denoiser) -> list[torch.nn.Parameter]:
    """The denoiser's trained parameters (the LoRA layers in LoRA mode): what the EMA tracks."""
    return [p for p in accelerator.unwrap_model(denoiser).parameters() if p.requires_grad]


class EmaWeights:
    """Swap the EMA weights into the parameters for the duration of the block."""

    def __init__(self, ema: EMAModel, parameters: list[torch.nn.Parameter]):
        self.ema, self.parameters = ema, parameters

    def __enter__(self):
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)

    def __exit__(self, *_):
        self.ema.restore(self.parameters)
