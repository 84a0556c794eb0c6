"""The GPU speed levers of the train stage (`train.compile`, `train.channels_last`, `train.tf32`), off by
default: each is kept on only where bench/gpu.py measured that it helps. Fused AdamW (pipeline/stages/train.py) and
PyTorch's scaled-dot-product attention (`train.attention: sdpa`) are always on."""

from __future__ import annotations

import torch

from pipeline.core.config import TrainParams


def apply_speed_settings(unet: torch.nn.Module, settings: TrainParams, device: torch.device) -> None:
    if settings.tf32 and device.type == "cuda":
        # fp32 matmuls and convolutions on tensor cores (10-bit mantissa); bf16/fp16 autocast ops are unaffected
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if settings.channels_last:
        unet.to(memory_format=torch.channels_last)


def compile_unet(unet: torch.nn.Module, settings: TrainParams) -> None:
    """torch.compile of the (prepared) UNet's forward, in place (Module.compile), so that unwrapping, EMA, LoRA
    and checkpoints still see the module itself. The first steps compile: minutes at SD 1.5's size."""
    if settings.compile:
        unet.compile()
