"""Each stage's settings are its own: training's precision and flipping re-run no VAE and no encode, and a
flip with no mirrored latents to draw from is refused before any work."""

import pytest

from pipeline.core.config import ConfigError
from pipeline.core.params_file import parse_params

from .conftest import merge, tiny_params_dict


def test_random_flip_needs_mirrored_latents_at_config_time():
    with pytest.raises(ConfigError, match="train.random_flip: .*encode.mirrored"):
        parse_params(merge(tiny_params_dict(), {"train": {"random_flip": True}}))
    both = parse_params(merge(tiny_params_dict(), {"train": {"random_flip": True}, "encode": {"mirrored": True}}))
    assert both.train.random_flip and both.encode.mirrored


def test_the_vae_trains_at_its_own_precision():
    params = parse_params(merge(tiny_params_dict(), {"train": {"mixed_precision": "bf16"}}))
    assert params.vae.mixed_precision == "no"
