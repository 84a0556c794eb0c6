"""Drift statistics: quiet on samples of the same distribution, loud on shifted ones."""

import numpy as np
import pandas as pd

from pipeline.quality.drift import feature_drift, mmd_test, population_stability_index
from pipeline.quality.drift_features import FEATURES, feature_table


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=2000)
    assert population_stability_index(reference, rng.normal(size=500)) < 0.05
    assert population_stability_index(reference, rng.normal(loc=1.0, size=500)) > 0.25


def test_psi_of_a_constant_reference_counts_what_left_it():
    reference = np.zeros(100)
    assert population_stability_index(reference, np.zeros(50)) == 0
    assert population_stability_index(reference, np.r_[np.zeros(25), np.ones(25)]) > 1


def test_mmd_permutation_test_separates_shifted_latents():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(150, 4, 2, 2))
    same = mmd_test(reference, rng.normal(size=(100, 4, 2, 2)), permutations=100)
    shifted = mmd_test(reference, rng.normal(loc=0.5, size=(100, 4, 2, 2)), permutations=100)
    assert same.pvalue > 0.05
    assert shifted.pvalue < 0.02 and shifted.mmd2 > same.mmd2


def test_features_read_brightness_colour_size_and_unknown_words():
    white = np.full((1, 8, 8, 3), 255, dtype=np.uint8)
    red = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    table = feature_table(np.concatenate([white, red]), [(64, 64), (640, 480)],
                          ["a red circle", "a Purple blob"], vocabulary={"a", "red", "circle"})
    assert list(table.columns) == list(FEATURES)
    assert table["brightness"].tolist() == [1.0, 1 / 3] and table["contrast"].tolist() == [0.0, 0.0]
    assert table["colourfulness"][0] == 0 and table["colourfulness"][1] > 0.3
    assert table["pixels"][1] > table["pixels"][0]
    assert table["oov_rate"].tolist() == [0.0, 2 / 3]


def test_feature_drift_reports_every_feature_with_psi_and_ks():
    rng = np.random.default_rng(0)
    reference = pd.DataFrame({name: rng.normal(size=400) for name in FEATURES})
    batch = reference.sample(100, random_state=0).assign(brightness=lambda f: f["brightness"] + 2)
    report = feature_drift(reference, batch)
    assert set(report) == set(FEATURES)
    assert report["brightness"]["ks_pvalue"] < 1e-6 and report["brightness"]["psi"] > 1
    assert report["contrast"]["ks_pvalue"] > 0.05 and report["contrast"]["psi"] < 0.25
