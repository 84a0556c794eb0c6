"""FID, KID and CLIP score: computed with stand-in weights built here, and plainly unavailable without them."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pipeline.contracts.data import load_split
from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError
from pipeline.core.params_file import parse_params
from pipeline.evaluation.external_metrics import ExternalMetrics, InceptionFeatures, external_metrics
from pipeline.stages.evaluate import evaluate

from .conftest import merge, save_random_clip, tiny_params_dict


class StandInInception(torch.nn.Module):
    """Random weights with the FID Inception's calling convention (0-255 images at 299 px in)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=13, stride=13)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert images.shape[-2:] == (299, 299)
        return torch.relu(self.conv(images / 255.0)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception-2015-12-05.pt"
    torch.jit.script(StandInInception()).save(str(path))
    return path


@pytest.fixture(scope="module")
def clip_folder(trained_project, tmp_path_factory):
    """A tiny random CLIP saved as a transformers folder, with the project's own tokenizer."""
    _, paths = trained_project
    return save_random_clip(paths.sd_model / "tokenizer", tmp_path_factory.mktemp("clip"))


def test_without_weights_the_report_says_so_and_has_no_number(trained_project):
    _, paths = trained_project
    recorded = json.loads((paths.metrics / "eval.json").read_text())
    # the synthetic shapes are judged by their reader, not by a label classifier
    assert set(recorded["unavailable"]) == {"fid", "kid", "clip_score", "label_adherence"}
    assert "nothing was downloaded" in recorded["unavailable"]["fid"]
    assert "evaluate.clip_model is not set" == recorded["unavailable"]["clip_score"]
    assert not {"fid", "kid", "clip_score"} & set(recorded)


def test_fid_and_kid_are_zero_for_the_same_images_and_grow_with_a_shift(trained_project, inception_file):
    _, paths = trained_project
    real = load_split(paths, "val")[0]
    inception = InceptionFeatures(torch.jit.load(str(inception_file)))
    scorer = ExternalMetrics(inception=inception, real_features=inception(torch.from_numpy(real).permute(0, 3, 1, 2)))
    from PIL import Image

    same = scorer.score([Image.fromarray(image) for image in real], [""] * len(real))
    shifted = scorer.score([Image.fromarray(255 - image) for image in real], [""] * len(real))
    assert same["fid"] == pytest.approx(0, abs=1e-6) and shifted["fid"] > 1e4 * max(same["fid"], 1e-9)
    assert abs(same["kid"]) < shifted["kid"] / 10  # KID is unbiased: near zero, either sign, for equal sets


def test_configured_weights_give_fid_kid_and_clip_score_deterministically(
    trained_project, inception_file, clip_folder, tmp_path
):
    _, trained = trained_project
    shutil.copytree(trained.root, tmp_path / "project", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    paths = Paths(tmp_path / "project")
    params = parse_params(merge(tiny_params_dict(), {
        "evaluate": {"inception_weights": str(inception_file), "clip_model": str(clip_folder)}
    }))
    first = evaluate(params, paths)
    recorded = json.loads((paths.metrics / "eval.json").read_text())
    assert set(recorded["unavailable"]) == {"label_adherence"}  # only the check that does not apply to shapes
    for name in ("fid", "kid", "clip_score"):
        assert math.isfinite(recorded[name]) and recorded[f"{name}_std"] >= 0
    assert recorded["fid"] > 0 and recorded["clip_score"] >= 0
    assert evaluate(params, paths) == first


def test_a_missing_weights_file_is_named(trained_project, tmp_path):
    params = parse_params(merge(tiny_params_dict(), {"evaluate": {"inception_weights": str(tmp_path / "nope.pt")}}))
    with pytest.raises(ConfigError, match="evaluate.inception_weights"):
        external_metrics(params.evaluate, tmp_path, [np.zeros((2, 32, 32, 3), dtype=np.uint8)])


def test_an_unloadable_clip_model_is_reported_not_downloaded(tmp_path):
    params = parse_params(merge(tiny_params_dict(), {"evaluate": {"clip_model": "nobody/no-such-clip"}}))
    scorer = external_metrics(params.evaluate, tmp_path, [np.zeros((2, 32, 32, 3), dtype=np.uint8)])
    assert scorer.clip is None and "nobody/no-such-clip" in scorer.unavailable["clip_score"]
