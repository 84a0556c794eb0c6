"""The small records stages leave for later stages, flows and people: file names, keys and readers."""

from __future__ import annotations

import csv

from pipeline.atomic import atomic_file, read_json
from pipeline.contracts.paths import Paths

# validate: reports/validation/
SUMMARY = "summary.json"
QUARANTINE = "quarantine.csv"
DATA_DOCS = "data_docs"

# vae, train, evaluate, register: metrics/
VAE_METRICS = "vae.json"
TRAIN_METRICS = "train.json"
LOSS_PLOT = "train_loss.csv"
EVAL_METRICS = "eval.json"
HEADLINE_METRICS = ("adherence", "noise_mse", "noise_r2", "vae_psnr", "vae_ssim", "fid", "kid", "clip_score")
UNAVAILABLE = "unavailable"  # eval.json's map of metric -> why it could not be computed here
REGISTRY_RECORD = "registry.json"

# the MLflow registry: aliases and the version tags register writes and monitoring reads
CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG_PREFIX = "metric."


def read_metrics(paths: Paths) -> dict[str, float]:
    """The numeric metrics of metrics/eval.json (without the `unavailable` reasons)."""
    return {name: value for name, value in read_json(paths.metrics / EVAL_METRICS).items() if name != UNAVAILABLE}


def write_loss_curve(target, curve: list[list[float]]) -> None:
    with atomic_file(target) as staging, open(staging, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows(curve)
