"""Label adherence for labelled data sets: does a generated image show the label it was prompted with?

A data set is labelled when its training captions are categorical: between 2 and `evaluate.max_labels`
distinct non-empty captions, each on at least `evaluate.min_images_per_label` training images. Class
sub-folders with a label template, captions built from a label column, or imagefolder metadata such as
"a handwritten digit seven" all look like that; free-text captions do not. The label is the caption.

The judge is a logistic regression on pixels downscaled to `evaluate.classifier_resolution` (standardised,
lbfgs: deterministic and seconds on two CPU cores), fit on the real training images, at most
`evaluate.classifier_images_per_label` per label. Its accuracy on the real validation images is reported
beside the adherence, so a reader (and the registry gate) can see whether to trust it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.contracts.data import MANIFEST, read_images
from pipeline.contracts.paths import Paths
from pipeline.core.config import EvaluateParams

MAX_ITERATIONS = 2000
# One BLAS thread: the fit is small, and beside torch's threads a BLAS pool of its own was 13x slower on two
# busy cores (0.7 s against 10 s for the 1,600 digits); one thread also gives the same numbers on every machine.
BLAS_THREADS = 1
METRIC_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in metric and tag names


def categorical_labels(captions: Iterable[str], params: EvaluateParams) -> tuple[list[str], str | None]:
    """The sorted labels when the captions are categorical, else no labels and why not."""
    counts = Counter(caption for caption in captions if caption)
    if not 2 <= len(counts) <= params.max_labels:
        return [], (f"the training captions are not categorical: {len(counts)} distinct non-empty captions "
                    f"(labels need 2 to evaluate.max_labels={params.max_labels})")
    rare = [caption for caption, count in counts.items() if count < params.min_images_per_label]
    if rare:
        return [], (f"the training captions are not categorical: {len(rare)} of {len(counts)} distinct captions "
                    f"are on fewer than evaluate.min_images_per_label={params.min_images_per_label} images "
                    f"(e.g. {sorted(rare)[0]!r})")
    return sorted(counts), None


def pixel_features(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 NHWC images, area-downscaled to resolution x resolution, flattened to [0, 1] floats."""
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    small = torch.nn.functional.interpolate(batch, size=(resolution, resolution), mode="area")
    return small.flatten(1).numpy().astype(np.float64)


def classifier_inputs(images: list[Image.Image], resolution: int) -> np.ndarray:
    return pixel_features(np.stack([np.asarray(image.convert("RGB")) for image in images]), resolution)


def split_features(paths: Paths, split: str, labels: list[str], params: EvaluateParams,
                   per_label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a processed split's labelled images (the first `per_label` of each label in
    manifest order when given), read one image size at a time (bucketed splits hold several)."""
    manifest = pd.read_parquet(paths.processed / split / MANIFEST)
    rows = manifest[manifest["caption"].isin(labels)]
    if per_label is not None:
        rows = rows.groupby("caption", sort=False).head(per_label)
    features, targets = [], []
    for _, group in rows.groupby(["height", "width"], sort=True):
        features.append(pixel_features(read_images(paths, group), params.classifier_resolution))
        targets.append(group["caption"].to_numpy())
    if not features:
        return np.empty((0, 3 * params.classifier_resolution**2)), np.empty(0, dtype=object)
    return np.concatenate(features), np.concatenate(targets)


def fit_label_classifier(paths: Paths, labels: list[str], params: EvaluateParams) -> tuple[Pipeline, float | None]:
    """The classifier fit on the real training images, and its accuracy on the real validation images."""
    features, targets = split_features(paths, "train", labels, params, params.classifier_images_per_label)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITERATIONS))
    with threadpool_limits(BLAS_THREADS):
        classifier.fit(features, targets)
    val_features, val_targets = split_features(paths, "val", labels, params)
    if not len(val_targets):
        return classifier, None
    return classifier, float((predict(classifier, val_features) == val_targets).mean())


def predict(classifier: Pipeline, features: np.ndarray) -> np.ndarray:
    with threadpool_limits(BLAS_THREADS):
        return classifier.predict(features)


def metric_label(label: str) -> str:
    """A label as it can appear in a metric name."""
    return METRIC_NAME_UNSAFE.sub("_", label)[:120]


def label_adherence_metrics(classifier: Pipeline, rows: list[list[Image.Image]], prompts: list[str],
                            labels: list[str], resolution: int) -> dict[str, float]:
    """Share of the images prompted with a label that the classifier reads as that label, overall and per label."""
    hits = {}
    for prompt, images in zip(prompts, rows, strict=True):
        if prompt in labels:
            hits[prompt] = predict(classifier, classifier_inputs(images, resolution)) == prompt
    metrics = {f"label_adherence.{metric_label(label)}": float(hit.mean()) for label, hit in hits.items()}
    every = np.concatenate(list(hits.values()))
    metrics.update(label_adherence=float(every.mean()), label_adherence_samples=len(every))
    return metrics


@dataclass(frozen=True)
class LabelJudge:
    """What evaluate needs to judge samples by label: the fitted classifier and the labels it knows."""

    classifier: Pipeline
    labels: list[str]
    accuracy: float | None  # on the real validation images; None when none of them is labelled
    resolution: int

    def __call__(self, rows: list[list[Image.Image]], prompts: list[str]) -> dict[str, float]:
        return label_adherence_metrics(self.classifier, rows, prompts, self.labels, self.resolution)


def label_judge(paths: Paths, prompts: list[str], params: EvaluateParams) -> tuple[LabelJudge | None, str | None]:
    """A judge for a labelled data set whose labels are among the prompts, else None and why not."""
    labels, why_not = categorical_labels(pd.read_parquet(paths.processed / "train" / MANIFEST)["caption"], params)
    if why_not:
        return None, why_not
    if not set(prompts) & set(labels):
        return None, f"none of the {len(prompts)} evaluation prompts is one of the data's {len(labels)} labels"
    classifier, accuracy = fit_label_classifier(paths, labels, params)
    return LabelJudge(classifier, labels, accuracy, params.classifier_resolution), None
