"""The drift features of a sample, computed the same way for the training set (by `preprocess`, saved as
data/processed/reference_features.parquet) and for every new batch (by `monitor`), on images already
converted and cropped to the training resolution:

- brightness, contrast: mean and standard deviation of the grey level, in [0, 1];
- colourfulness: Hasler and Süsstrunk's (2003) metric on [0, 1] RGB;
- pixels: the original image's width x height (log10);
- caption_words: the caption's word count;
- oov_rate: the share of the caption's words the training captions never used.

numpy and pandas only: preprocess's Ray workers import this module, and the drift tests' torch and scipy
(`pipeline.quality.drift`) would add seconds to every worker's start.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

IMAGE_FEATURES = ("brightness", "contrast", "colourfulness")  # measured on the pixels: `image_features`
FEATURES = (*IMAGE_FEATURES, "pixels", "caption_words", "oov_rate")


def words_of(caption: str) -> list[str]:
    return caption.lower().split()


def image_features(images: np.ndarray) -> pd.DataFrame:
    """Brightness, contrast and colourfulness per image; `images` is uint8 NHWC at the training resolution."""
    pixels = images.astype(np.float64) / 255.0
    grey = pixels.mean(axis=-1)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    red_green, yellow_blue = red - green, (red + green) / 2 - blue
    colourfulness = np.hypot(red_green.std(axis=(1, 2)), yellow_blue.std(axis=(1, 2))) + 0.3 * np.hypot(
        red_green.mean(axis=(1, 2)), yellow_blue.mean(axis=(1, 2))
    )
    return pd.DataFrame({
        "brightness": grey.mean(axis=(1, 2)),
        "contrast": grey.std(axis=(1, 2)),
        "colourfulness": colourfulness,
    })


def metadata_features(sizes: list[tuple[int, int]], captions: list[str], vocabulary: set[str]) -> pd.DataFrame:
    """Original pixel count, caption length and out-of-vocabulary rate per sample."""
    words = [words_of(caption) for caption in captions]
    return pd.DataFrame({
        "pixels": np.log10([max(width * height, 1) for width, height in sizes]),
        "caption_words": [len(w) for w in words],
        "oov_rate": [sum(word not in vocabulary for word in w) / len(w) if w else 0.0 for w in words],
    })


def feature_table(images: np.ndarray, sizes: list[tuple[int, int]], captions: list[str],
                  vocabulary: set[str]) -> pd.DataFrame:
    """One row of FEATURES per sample; `images` is uint8 NHWC at the training resolution."""
    return combine_features(image_features(images), metadata_features(sizes, captions, vocabulary))


def combine_features(images: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([images.reset_index(drop=True), metadata.reset_index(drop=True)], axis=1)[list(FEATURES)]
