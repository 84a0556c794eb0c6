"""Honest training speed: steady-state images/s, the FLOPs of one training image, and the model FLOPs
utilisation (MFU) against a matmul rate measured on the same GPU.

Steady state leaves out the first steps (warm-up: allocator growth, cuDNN autotuning, torch.compile) and
the time spent validating, sampling and checkpointing, each of which is reported on its own. GPU work is
asynchronous, so every boundary of a timed span waits for the device first.
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

WARMUP_STEPS = 10  # at most; short runs use a fifth of their steps
MATMUL_SIDE = 8192  # the bf16 matmul whose rate is the MFU's peak (767 TFLOP/s on an H100 SXM)


def warmup_steps(steps_to_run: int) -> int:
    return min(WARMUP_STEPS, steps_to_run // 5)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Times a training loop: `step_done` after every step, `excluded(what)` around work that is not training."""

    def __init__(self, device: torch.device, steps_to_run: int):
        self.device, self.warmup = device, warmup_steps(steps_to_run)
        self.started = time.perf_counter()
        self.steps, self.steady_images = 0, 0
        self.steady_since: float | None = self.started if self.warmup == 0 else None
        self.warmup_seconds = 0.0
        self.excluded_seconds: dict[str, float] = defaultdict(float)
        self.excluded_while_steady = 0.0

    def step_done(self, images: int) -> None:
        self.steps += 1
        if self.steady_since is not None:
            self.steady_images += images
        elif self.steps == self.warmup:
            synchronize(self.device)
            self.steady_since = time.perf_counter()
            self.warmup_seconds = self.steady_since - self.started - sum(self.excluded_seconds.values())

    @contextmanager
    def excluded(self, what: str) -> Iterator[None]:
        synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            seconds = time.perf_counter() - started
            self.excluded_seconds[what] += seconds
            if self.steady_since is not None:
                self.excluded_while_steady += seconds

    def steady_seconds(self) -> float:
        if self.steady_since is None:
            return 0.0
        synchronize(self.device)
        return time.perf_counter() - self.steady_since - self.excluded_while_steady

    def images_per_second(self) -> float:
        seconds = self.steady_seconds()
        return self.steady_images / seconds if seconds > 0 else 0.0

    def summary(self) -> dict[str, float]:
        """train.json's speed fields."""
        return dict(images_per_second=self.images_per_second(), steady_steps=self.steps - self.warmup,
                    steady_seconds=self.steady_seconds(), warmup_steps=self.warmup,
                    warmup_seconds=self.warmup_seconds,
                    **{f"{what}_seconds": self.excluded_seconds.get(what, 0.0)
                       for what in ("validation", "sampling", "checkpoint")})


def flops_of(work: Callable[[], None]) -> int:
    """The FLOPs `work` runs, counted by PyTorch's FlopCounterMode (matmuls and convolutions, forward and
    backward; a frozen weight's gradient is not computed and so not counted)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def measured_matmul_flops_per_second(device: torch.device, side: int = MATMUL_SIDE, repeats: int = 20) -> float | None:
    """The bf16 matmul rate of this GPU, the MFU's denominator; None off CUDA (no peak is measured on CPUs)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(side, side, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * side**3 * repeats / (time.perf_counter() - started)


def utilisation(images_per_second: float, flops_per_image: int, peak: float | None) -> dict[str, float]:
    """MFU fields for train.json: only where a peak was measured."""
    if peak is None:
        return {}
    return dict(matmul_flops_per_second=peak, mfu=images_per_second * flops_per_image / peak)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak RSS (VmHWM: unlike ru_maxrss, Linux does not carry
    the parent's peak over into it across exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        return int(next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS reports bytes
