"""Drift of a new batch against the training set: per-feature tests and a kernel two-sample test.

The features (`pipeline.quality.drift_features`) get a population stability index (PSI, on the reference's deciles) and
a two-sample Kolmogorov-Smirnov test each. VAE latents get an MMD test (Gaussian kernel, median-distance
bandwidth) with a permutation p-value, which catches shifts no single hand-made feature sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from pipeline.quality.drift_features import FEATURES

PSI_BINS = 10
PSI_FLOOR = 1e-4  # an empty bin would make PSI infinite


def population_stability_index(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> float:
    """PSI over the reference's quantile bins: < 0.1 stable, 0.1-0.25 moderate, > 0.25 major shift."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # a constant reference: compare "equal to it" against "not"
        expected = np.array([1.0, 0.0])
        observed = np.array([np.mean(current == edges[0]), np.mean(current != edges[0])])
    else:
        inner = edges[1:-1]
        expected = np.bincount(np.searchsorted(inner, reference, side="right"), minlength=len(edges) - 1)
        observed = np.bincount(np.searchsorted(inner, current, side="right"), minlength=len(edges) - 1)
        expected, observed = expected / expected.sum(), observed / observed.sum()
    expected, observed = np.maximum(expected, PSI_FLOOR), np.maximum(observed, PSI_FLOOR)
    return float(np.sum((observed - expected) * np.log(observed / expected)))


def feature_drift(reference: pd.DataFrame, batch: pd.DataFrame) -> dict[str, dict[str, float]]:
    """For each feature: PSI, the KS statistic and its p-value, and the two means."""
    report = {}
    for name in FEATURES:
        ref, cur = reference[name].to_numpy(float), batch[name].to_numpy(float)
        ks = stats.ks_2samp(ref, cur)
        report[name] = dict(
            psi=population_stability_index(ref, cur),
            ks_statistic=float(ks.statistic),
            ks_pvalue=float(ks.pvalue),
            reference_mean=float(ref.mean()),
            batch_mean=float(cur.mean()),
        )
    return report


@dataclass(frozen=True)
class MmdResult:
    mmd2: float
    pvalue: float
    permutations: int


def _unbiased_mmd2(kernel: torch.Tensor, n: int) -> torch.Tensor:
    xx, yy, xy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    m = kernel.shape[0] - n
    return ((xx.sum() - xx.diagonal().sum()) / (n * (n - 1)) + (yy.sum() - yy.diagonal().sum()) / (m * (m - 1))
            - 2 * xy.mean())


def mmd_test(reference: np.ndarray, batch: np.ndarray, *, permutations: int = 200, seed: int = 0) -> MmdResult:
    """Unbiased MMD² with a Gaussian kernel (bandwidth: median pairwise distance) and a permutation
    p-value: how often relabelling the pooled samples gives an MMD² at least as large."""
    pooled = torch.from_numpy(np.concatenate([reference, batch]).reshape(len(reference) + len(batch), -1)).double()
    distances = torch.cdist(pooled, pooled) ** 2
    bandwidth = distances[distances > 0].median()
    kernel = torch.exp(-distances / bandwidth)
    n = len(reference)
    observed = _unbiased_mmd2(kernel, n)
    generator = torch.Generator().manual_seed(seed)
    exceed = 0
    for _ in range(permutations):
        order = torch.randperm(len(pooled), generator=generator)
        exceed += int(_unbiased_mmd2(kernel[order][:, order], n) >= observed)
    return MmdResult(mmd2=float(observed), pvalue=(1 + exceed) / (1 + permutations), permutations=permutations)
