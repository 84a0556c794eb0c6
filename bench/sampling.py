"""Sampling speed and adherence: DPM-Solver++ at 20 steps versus DDPM at 1000 steps, side by side.

    .venv/bin/python bench/sampling.py [--model models/sd] [--seeds 2]

Both schedulers sample every colour x shape prompt with the same seeds, as one batch per prompt,
on the same model in the same process; prints images/s of each, the ratio, and the adherence of each.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.data.shapes import SHAPE_PROMPTS
from pipeline.diffusion.families import load_pipeline
from pipeline.diffusion.schedule import use_scheduler
from pipeline.evaluation.shape_adherence import shape_adherence_metrics

GUIDANCE = 4.0
RUNS = {"DPM-Solver++ 20 steps": ("dpm++", 20), "DDPM 1000 steps": ("ddpm", 1000)}


def sample_all(pipeline, steps: int, seeds: int) -> tuple[list, float]:
    rows, started = [], time.perf_counter()
    for prompt in SHAPE_PROMPTS:
        rows.append(pipeline(
            [prompt] * seeds, num_inference_steps=steps, guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(seed) for seed in range(seeds)],
        ).images)
    return rows, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/sd")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt (the batch size)")
    args = parser.parse_args()
    pipeline = load_pipeline(args.model)
    results = {}
    for name, (scheduler, steps) in RUNS.items():
        use_scheduler(pipeline, scheduler)
        rows, seconds = sample_all(pipeline, steps, args.seeds)
        adherence = shape_adherence_metrics(rows, list(SHAPE_PROMPTS))["adherence"]
        results[name] = (len(rows) * args.seeds / seconds, adherence)
        print(f"{name:<24} {results[name][0]:8.2f} images/s   adherence {results[name][1]:.2f}")
    fast, slow = results.values()
    print(f"speed-up {fast[0] / slow[0]:.1f}x")


if __name__ == "__main__":
    main()
