"""Where networks run: the one device rule of every stage that runs one.

The accelerator when there is one (accelerate's choice: this process's CUDA device under `accelerate
launch`, else the first GPU, else the CPU); `sdpipe --device cpu`, or `ACCELERATE_USE_CPU=1` in the
environment (accelerate's own switch, so `accelerate launch --cpu` and `dvc repro` agree), forces the CPU.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

FORCE_CPU = "ACCELERATE_USE_CPU"


def force_cpu() -> None:
    """Run every network of this process, and of the processes it starts, on the CPU."""
    os.environ[FORCE_CPU] = "true"


def cpu_forced() -> bool:
    return parse_flag_from_env(FORCE_CPU)


def compute_device() -> torch.device:
    return PartialState(cpu=cpu_forced()).device
