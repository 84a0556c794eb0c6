"""What the parameters need to know of each model family, read from the family's own module.

Each module in pipeline/diffusion/families/ opens with a `DECLARED` literal: its name, scratch presets,
objective, scratch VAE latent channels, latent patch, whether its VAE's latents are shifted and whether LoRA
files have a kohya key layout for it. Config validation reads these literals from the modules' source without
importing them, because those modules import torch and diffusers and params are validated in light processes
(the flows, the CLI); the Family classes read the same literal, so every fact is declared once, in the family's
module.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FAMILY_MODULES = Path(__file__).resolve().parents[1] / "diffusion" / "families"
DECLARATION = "DECLARED"


@dataclass(frozen=True)
class Declared:
    """A family's plain facts."""

    name: str  # model.family
    presets: tuple[str, ...]  # model.preset: its scratch sizes, the first the smallest
    objective: Literal["ddpm", "flow"]  # DDPM (epsilon or v target) or rectified-flow matching (velocity)
    latent_channels: int  # the scratch VAE's latent channels unless vae.latent_channels sets them
    patch: int  # latent pixels per denoiser token side: the side must divide by the VAE's downsampling x this
    latents_shifted: bool  # its VAE's latents are shifted by their mean (a `shift_factor`) before scaling
    kohya_lora: bool = False  # kohya's lora_unet_ key layout exists for it (model.lora.export: kohya)

    @property
    def flow(self) -> bool:
        return self.objective == "flow"


def declared_in(module: Path) -> Declared | None:
    """The `DECLARED` literal of a family module, or None for a module without one (base.py, __init__.py)."""
    for node in ast.parse(module.read_text(encoding="utf-8"), str(module)).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [DECLARATION]:
            try:
                return Declared(**ast.literal_eval(node.value))
            except (ValueError, TypeError) as error:
                raise ValueError(f"{module}: {DECLARATION} must be a dict literal of Declared's fields ({error})") \
                    from None
    return None


def declared_families(folder: Path = FAMILY_MODULES) -> dict[str, Declared]:
    """Every family's facts by its name, in the order of their module names."""
    declared = [facts for module in sorted(folder.glob("*.py")) if (facts := declared_in(module))]
    return {facts.name: facts for facts in declared}
