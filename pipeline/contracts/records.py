"""The small records stages leave for later stages, flows and people: file names, keys and readers."""

from __future__ import annotations

import csv
import re

from pipeline.contracts.paths import Paths
from pipeline.core.atomic import atomic_file, read_json

# validate: reports/validation/
SUMMARY = "summary.json"
QUARANTINE = "quarantine.csv"
DATA_DOCS = "data_docs"

# vae, train, evaluate, register: metrics/
VAE_METRICS = "vae.json"
TRAIN_METRICS = "train.json"
LOSS_PLOT = "train_loss.csv"
EVAL_METRICS = "eval.json"
HEADLINE_METRICS = ("adherence", "label_adherence", "classifier_accuracy", "noise_mse", "noise_r2", "vae_psnr",
                    "vae_ssim", "fid", "kid", "clip_score")
UNAVAILABLE = "unavailable"  # eval.json's map of metric -> why it could not be computed here
PROMPTS = "prompts"  # eval.json's list of the prompts the samples were drawn with, in grid order
REGISTRY_RECORD = "registry.json"

# train: models/sd's model card, whose first python block under CALL_HEADING samples the model in plain diffusers
# as sdpipe does (pipeline/diffusion/plain_call.py); register's version description and `sdpipe models` repeat it
MODEL_CARD = "README.md"
CALL_HEADING = "## Sample it in plain diffusers"

# the MLflow registry: aliases and the version tags register writes and monitoring reads
CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG_PREFIX = "metric."


def read_metrics(paths: Paths) -> dict[str, float]:
    """The numeric metrics of metrics/eval.json (without the prompts and the `unavailable` reasons)."""
    return {name: value for name, value in read_json(paths.metrics / EVAL_METRICS).items()
            if name not in (UNAVAILABLE, PROMPTS)}


def read_unavailable(paths: Paths) -> dict[str, str]:
    """The metrics metrics/eval.json could not compute, with why."""
    return read_json(paths.metrics / EVAL_METRICS).get(UNAVAILABLE, {})


def write_loss_curve(target, curve: list[list[float]]) -> None:
    with atomic_file(target) as staging, open(staging, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows(curve)


def call_in_card(card: str) -> str | None:
    """The model card's plain-diffusers call: the first python block under CALL_HEADING (None in an older card)."""
    _, heading, rest = card.partition(CALL_HEADING)
    found = re.search(r"```python\n(.*?)```", rest, re.DOTALL) if heading else None
    return found.group(1) if found else None
