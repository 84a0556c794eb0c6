"""A labelled data set that is not ours: scikit-learn's handwritten digits, written as an imagefolder.

The whole chain runs on it through the stage functions the CLI calls; evaluation must then judge the model
by the data's own labels (prompts from its captions, label adherence, the classifier's accuracy on the
real digits) and the registry must gate on that, not on the synthetic shapes.
"""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.contracts.paths import Paths
from pipeline.core.params_file import parse_params
from pipeline.evaluation.label_adherence import categorical_labels, metric_label

from .conftest import merge, run_every_stage, tiny_params_dict

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
UNCAPTIONED_EVERY = 10  # one digit in ten has no caption, as a partly labelled folder would
SIDE = 32
TEST_DIGITS = 600  # of the 1,797: ~54 captioned per digit, enough for the classifier, quick to train on


def write_digits_imagefolder(folder, count: int | None = None) -> list[str]:
    """The first `count` (default: all 1,797) UCI digits as 32 px PNGs, dark on white, with metadata.jsonl
    captions; returns the captions written."""
    digits = load_digits()
    folder.mkdir(parents=True)
    lines, captions = [], []
    for index, (pixels, target) in enumerate(zip(digits.images[:count], digits.target[:count], strict=True)):
        grey = Image.fromarray((255 - pixels * 255 / 16).astype(np.uint8)).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
        grey.convert("RGB").save(folder / f"{index:04d}.png")
        caption = "" if index % UNCAPTIONED_EVERY == 0 else f"a handwritten digit {DIGIT_NAMES[target]}"
        captions.append(caption)
        lines.append(json.dumps({"file_name": f"{index:04d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return captions


@pytest.fixture(scope="module")
def digits_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digits_imagefolder(root / "data" / "digits", TEST_DIGITS)
    params = parse_params(merge(tiny_params_dict(), {
        "ingest": {"source": "folder", "folder": {"path": "data/digits"}},
        "validate": {"max_empty_caption_share": {"folder": 0.2}},
        "vae": {"steps": 10}, "train": {"steps": 10, "sample_every": 0},  # what is checked here is evaluation
    }))
    paths = Paths(root)
    run_every_stage(params, paths)
    return params, paths


def test_digits_are_judged_by_their_labels_and_gated_on_them(digits_project):
    params, paths = digits_project
    recorded = json.loads((paths.metrics / "eval.json").read_text())
    labels = sorted(f"a handwritten digit {name}" for name in DIGIT_NAMES)

    assert recorded["prompts"] == labels + [""]  # the grid's rows: the data's captions, then unconditional
    assert recorded["labels"] == 10
    assert recorded["classifier_accuracy"] >= params.register_.min_classifier_accuracy  # it can read real digits
    assert 0 <= recorded["label_adherence"] <= 1 and recorded["label_adherence_std"] >= 0
    per_label = [recorded[f"label_adherence.{metric_label(label)}"] for label in labels]
    assert recorded["label_adherence"] == pytest.approx(np.mean(per_label))  # every label has as many samples
    assert recorded["label_adherence_samples"] == 10 * params.evaluate.samples_per_prompt * params.evaluate.stability_repeats
    assert "adherence" not in recorded and "synthetic source only" in recorded["unavailable"]["adherence"]
    grid = Image.open(paths.samples_grid)
    assert grid.height == len(recorded["prompts"]) * SIDE * 4  # GRID_ZOOM: one row per prompt

    registry = json.loads((paths.metrics / "registry.json").read_text())
    assert (registry["gate_metric"], registry["gate_direction"]) == ("label_adherence", "maximize")
    assert registry["gate_rule"] == "auto: labelled data, label adherence"
    assert registry["gate_value"] == recorded["label_adherence"]
    assert (registry["promoted"], registry["refused"]) == (True, None)


def test_models_listing_shows_the_metric_that_decided(digits_project, capsys):
    import yaml

    from pipeline.cli import main

    params, paths = digits_project
    params_file = paths.root / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params_dict()))
    assert main(["--params", str(params_file), "models"]) == 0
    assert "gate label_adherence (promoted)" in capsys.readouterr().out


def test_captions_are_labels_only_when_categorical(tiny_params):
    params = tiny_params.evaluate
    digits = ["a handwritten digit one"] * 5 + ["a handwritten digit two"] * 7 + [""] * 3
    assert categorical_labels(digits, params) == (["a handwritten digit one", "a handwritten digit two"], None)
    labels, why = categorical_labels(digits + ["a one-off caption"], params)
    assert labels == [] and "fewer than evaluate.min_images_per_label=5 images (e.g. 'a one-off caption')" in why
    labels, why = categorical_labels([f"caption {i}" for i in range(60) for _ in range(5)], params)
    assert labels == [] and "60 distinct non-empty captions" in why
    assert categorical_labels(["only one"] * 9, params)[0] == []


def test_label_adherence_is_the_share_of_images_read_as_their_prompt():
    from sklearn.linear_model import LogisticRegression

    from pipeline.evaluation.label_adherence import label_adherence_metrics, pixel_features

    def image(level):
        return Image.new("RGB", (8, 8), (level,) * 3)

    examples = np.stack([np.full((8, 8, 3), level, np.uint8) for level in (0, 20, 40, 215, 235, 255)])
    classifier = LogisticRegression().fit(pixel_features(examples, 4), ["dark"] * 3 + ["light"] * 3)
    rows = [[image(10), image(250)], [image(245), image(230)], [image(0)]]
    metrics = label_adherence_metrics(classifier, rows, ["dark", "light", ""], ["dark", "light"], 4)
    assert metrics == {"label_adherence.dark": 0.5, "label_adherence.light": 1.0, "label_adherence": 0.75,
                       "label_adherence_samples": 4}  # the empty prompt is no label and is not counted
