"""What a model family declares: its pipeline and components, scratch sizes, text conditioning, denoiser
call, objective, LoRA targets and how its LoRA weights are saved. Every stage works through this interface,
so no stage names a family; adding one is a module in this folder and a line in its `__init__`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from pipeline.core.config import TrainParams
from pipeline.core.family_declarations import Declared
from pipeline.diffusion.components import load_pretrained
from pipeline.diffusion.tokenizer import tokenized


@dataclass(frozen=True)
class TextComponent:
    """A tokenizer and the text encoder that reads its ids, by their names in the pipeline."""

    tokenizer: str
    encoder: str
    encoder_class: type
    tokenizer_class: type
    sequence_length_is_a_param: bool = False  # T5: as long as model.max_sequence_length; CLIP: its own fixed length
    # the encoder reads the tokenizer's attention mask too (Chroma's T5): `token_ids` gives it beside the ids, as
    # `attention_mask_of(tokenizer)`, and conditioning that depends on it (the denoiser's mask) is a named tensor
    masked: bool = False


def attention_mask_of(tokenizer: str) -> str:
    """The name of a masked tokenizer's attention mask among the token tensors."""
    return f"{tokenizer}_attention_mask"


@dataclass(frozen=True)
class Scratch:
    """What a scratch model is built for: the data's captions and latents, and the preset's name."""

    captions: tuple[str, ...]
    preset: str
    vocab_size: int
    latent_channels: int
    latent_size: int
    max_sequence_length: int = 77  # model.max_sequence_length: T5's tokens per caption


class Family:
    """One architecture. Subclasses set the class attributes and implement the methods that raise; `declared`
    holds the module's `DECLARED` facts (pipeline/core/family_declarations.py), which config validation reads too."""

    declared: Declared
    pipeline_class: type[DiffusionPipeline]
    denoiser: str  # the pipeline component that training trains: "unet" or "transformer"
    denoiser_class: type
    text: tuple[TextComponent, ...]
    # the named tensors the text encoders give per caption (encode caches them; a sampler call takes each as the
    # argument of its name, and the empty prompt's as `negative_<name>`): states, pooled outputs, attention masks
    conditioning: tuple[str, ...]
    lora_targets: tuple[str, ...]  # diffusers' training scripts' defaults for the denoiser
    lora_layers_argument: str  # the keyword of pipeline_class.save_lora_weights for the denoiser's layers
    # UNet families save LoRA keys in diffusers' own format, as its SD/SDXL scripts do; the transformer families
    # PEFT's, as its SD3/Flux scripts do (converted, SD3's loader skipped the attention layers' to_q/k/v/out keys).
    lora_keys_to_diffusers: bool = False
    pipeline_options: dict = {}  # constructor arguments beside the components
    vae_in_fp32: bool = False  # its VAE gives NaNs in fp16: kept in fp32 under mixed precision
    # why a plain-diffusers call of its model names an argument (the model card says it, pipeline/diffusion/plain_call.py)
    argument_reasons: dict[str, str] = {
        "guidance_scale": "the classifier-free guidance sdpipe samples with (`evaluate.guidance_scale`'s default)",
        "negative_prompt": "the prompt the guidance steers away from",
        "num_inference_steps": "the steps sdpipe samples with (`evaluate.num_inference_steps`'s default)",
        "height": "the size it was trained at",
        "width": "the size it was trained at",
        "max_sequence_length": "T5's tokens per prompt in training (`model.max_sequence_length`): T5 reading more pads "
                               "gives the prompt other states",
    }

    @property
    def name(self) -> str:
        return self.declared.name

    @property
    def presets(self) -> tuple[str, ...]:
        return self.declared.presets

    # building
    def scratch_components(self, scratch: Scratch) -> dict[str, object]:
        """Tokenizers, text encoders and the denoiser at a preset, randomly initialised."""
        raise NotImplementedError

    def training_objective(self, train: TrainParams, pretrained_scheduler: dict | None):
        """The forward process and target the denoiser is trained on (the pretrained model's schedule, if any)."""
        raise NotImplementedError

    def objective_of(self, scheduler_config: dict):
        """The training objective a saved pipeline's sampler config implies (validation and evaluation)."""
        raise NotImplementedError

    def objective_line(self, train: TrainParams) -> str:
        """The objective as the model card states it."""
        if not self.declared.flow:
            return f"prediction type: {train.prediction_type}"
        flow = train.flow
        shift = flow.shift if flow.shift is not None else "the default (the family's, or the pretrained scheduler's)"
        return (f"objective: flow matching (velocity), σ {flow.sampling}, shift {shift}, "
                f"loss weighting {flow.weighting}")

    # the conditioning
    def token_ids(self, tokenizers: dict, captions: list[str]) -> dict[str, torch.Tensor]:
        """Each tokenizer's ids, padded to its fixed length as the pipeline pads prompts (and a masked one's
        attention mask). Training keeps them per sample in scratch mode, caption dropout swapping them all."""
        tokens = {}
        for part in self.text:
            encoded = tokenized(tokenizers[part.tokenizer], captions)
            tokens[part.tokenizer] = encoded.input_ids
            if part.masked:
                tokens[attention_mask_of(part.tokenizer)] = encoded.attention_mask
        return tokens

    def encode_text(self, components: dict, token_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The named conditioning tensors (`conditioning`) of tokenized captions, as the pipeline computes them."""
        raise NotImplementedError

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor],
                image_sizes: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction for noisy latents (N, C, H, W), in their layout. `image_sizes` holds each
        sample's (original height, original width, crop top, crop left, height, width) in pixels."""
        raise NotImplementedError

    def denoiser_latent_channels(self, denoiser) -> int:
        """The VAE latent channels a (pretrained) denoiser takes."""
        return denoiser.config.in_channels

    # sampling
    def sampling_arguments(self, pipeline: DiffusionPipeline, prompts: list[str], guidance_scale: float,
                           negative_prompt: str | None = None) -> dict:
        """The pipeline call's prompt, guidance and size arguments, as this family's model was trained to be
        sampled."""
        negative = {"negative_prompt": [negative_prompt] * len(prompts)} if negative_prompt else {}
        return {"prompt": prompts, "guidance_scale": guidance_scale, **negative, **self.trained_size(pipeline)}

    def with_cached_states(self, arguments: dict) -> dict:
        """A sampler call whose prompts are cached conditioning tensors (each as the argument of its name, the
        empty prompt's as `negative_<name>`), as the pipeline takes them."""
        return arguments

    def trained_size(self, pipeline: DiffusionPipeline) -> dict[str, int]:
        """height and width in pixels of the latent side the denoiser's config records (training registers the
        side it trained at); none where it records no size."""
        side = getattr(pipeline, self.denoiser).config.get("sample_size")
        if side is None:
            return {}
        height, width = (side, side) if isinstance(side, int) else side
        return {"height": height * pipeline.vae_scale_factor, "width": width * pipeline.vae_scale_factor}

    def default_size(self, pipeline: DiffusionPipeline) -> dict[str, int]:
        """height and width the pipeline samples at when the call names none: its default_sample_size (Flux: 128
        latent pixels, whatever the transformer records), else the denoiser's sample_size (sd)."""
        side = getattr(pipeline, "default_sample_size", None) or getattr(pipeline, self.denoiser).config.sample_size
        height, width = (side, side) if isinstance(side, int) else side
        return {"height": height * pipeline.vae_scale_factor, "width": width * pipeline.vae_scale_factor}

    # loading and saving
    def load_tokenizers(self, location: str, root: Path, max_sequence_length: int = 77) -> dict[str, object]:
        """The pretrained tokenizers (T5's cut to `max_sequence_length`), by name."""
        loaded = {}
        for part in self.text:
            loaded[part.tokenizer] = load_pretrained(location, root, part.tokenizer, part.tokenizer_class.from_pretrained)
            if part.sequence_length_is_a_param:
                loaded[part.tokenizer].model_max_length = max_sequence_length
        return loaded

    def load_text(self, location: str, root: Path, max_sequence_length: int = 77, *,
                  dtype: torch.dtype = torch.float32) -> dict[str, object]:
        """The pretrained tokenizers and text encoders, the encoders frozen and read from their files in `dtype`."""
        loaded = self.load_tokenizers(location, root, max_sequence_length)
        for part in self.text:
            encoder = load_pretrained(location, root, part.encoder, part.encoder_class.from_pretrained, torch_dtype=dtype)
            loaded[part.encoder] = encoder.eval().requires_grad_(False)
        return loaded

    def load_denoiser(self, location: str, root: Path, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The pretrained denoiser, read from its files in `dtype`."""
        return load_pretrained(location, root, self.denoiser, self.denoiser_class.from_pretrained, torch_dtype=dtype)

    def pipeline(self, components: dict) -> DiffusionPipeline:
        pipeline = self.pipeline_class(**{**components, **self.pipeline_options})
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def lora_layers(self, lora_denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The denoiser's LoRA layers, copied to the CPU and keyed as the family's load_lora_weights reads them."""
        layers = {name: value.detach().to("cpu", copy=True) for name, value in
                  get_peft_model_state_dict(lora_denoiser).items()}
        return convert_state_dict_to_diffusers(layers) if self.lora_keys_to_diffusers else layers

    def save_lora(self, folder: Path, layers: dict[str, torch.Tensor], config: dict) -> None:
        """The layers with their LoraConfig as the file's adapter metadata: without it load_lora_weights assumes
        alpha = rank (and no DoRA), as diffusers' training scripts avoid by saving it the same way."""
        metadata = self.lora_layers_argument.replace("_layers", "_adapter_metadata")
        self.pipeline_class.save_lora_weights(folder, **{self.lora_layers_argument: layers, metadata: config},
                                              safe_serialization=True)

    def text_encoders(self, components: dict) -> list[torch.nn.Module]:
        return [components[part.encoder] for part in self.text]
