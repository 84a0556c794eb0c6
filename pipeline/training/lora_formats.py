"""LoRA files in the key layout of kohya's sd-scripts, which ComfyUI and AUTOMATIC1111 load: written beside the
diffusers file when model.lora.export lists kohya (the UNet families, sd and sdxl).

A kohya module is named `lora_unet_` + the diffusers module path with `_` for `.` (kohya trains SD 1.x on
diffusers' UNet; for SDXL ComfyUI maps the same names), each with `.lora_down.weight` (diffusers' lora.down,
peft's lora_A), `.lora_up.weight` and `.alpha`, which with the rank gives the scale alpha / rank. sdpipe never
trains the text encoders under LoRA, so there are no `lora_te_` keys. diffusers' own kohya conversion
(`load_lora_weights` of the file) reads it back; a test checks it gives the diffusers file's images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import save_file

from pipeline.core.config import ConfigError, LoraParams
from pipeline.diffusion.families.base import Family

KOHYA_LORA_WEIGHTS = "kohya_lora_weights.safetensors"
UNET_PREFIX = "lora_unet_"
# the suffixes of family.lora_layers' keys (diffusers' for sd/sdxl, peft's otherwise) and kohya's for them
KOHYA_SUFFIXES = {".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight",
                  ".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def kohya_layers(layers: dict[str, torch.Tensor], settings: LoraParams) -> dict[str, torch.Tensor]:
    """The denoiser's LoRA layers (keyed by module path, as Family.lora_layers gives them) in kohya's layout."""
    kohya = {}
    for key, value in layers.items():
        module, suffix = split_lora_key(key)
        name = UNET_PREFIX + module.replace(".", "_")
        kohya[name + KOHYA_SUFFIXES[suffix]] = value.contiguous()
        kohya[name + ".alpha"] = torch.tensor(settings.alpha, dtype=torch.float32)
    return kohya


def split_lora_key(key: str) -> tuple[str, str]:
    """(the module path, the weight's suffix) of a LoRA weight's key."""
    suffix = next((suffix for suffix in KOHYA_SUFFIXES if key.endswith(suffix)), None)
    if suffix is None:
        raise ConfigError(f"model.lora.export: kohya has no key for the LoRA weight {key} (DoRA magnitudes and "
                          "other extras are diffusers-only)")
    return key.removesuffix(suffix), suffix


def modules_diffusers_reads(family: Family, kohya: dict[str, torch.Tensor]) -> set[str]:
    """The denoiser modules diffusers' kohya conversion (what load_lora_weights runs) puts a kohya file's layers on."""
    state, _ = family.pipeline_class.lora_state_dict(dict(kohya))
    return {key.removeprefix(f"{family.denoiser}.").rsplit(".lora_", 1)[0]
            for key in convert_unet_state_dict_to_peft(state)}


def save_kohya_lora(folder: Path, family: Family, layers: dict[str, torch.Tensor], settings: LoraParams) -> None:
    """The kohya file, once diffusers is seen to read every layer back onto the module it was trained on: kohya's
    `_` for `.` is ambiguous, and diffusers' conversion guesses module names from a list it knows."""
    kohya = kohya_layers(layers, settings)
    trained = {split_lora_key(key)[0] for key in layers}
    misread = sorted(trained - modules_diffusers_reads(family, kohya))
    if misread:
        raise ConfigError(f"model.lora.export: kohya: diffusers would not read the layers on {', '.join(misread)} "
                          "back onto those modules; drop them from model.lora.target_modules or export only diffusers")
    save_file(kohya, folder / KOHYA_LORA_WEIGHTS,
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(settings.rank),
                        "ss_network_alpha": str(settings.alpha)})
