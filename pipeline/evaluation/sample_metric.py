"""The number train scores its validation samples by (`train.sample_metric`), from evaluate's own metrics:

- adherence: the shapes reader (pipeline.evaluation.shape_adherence) on the prompts that are colour-and-shape
  captions ("a red circle"): adherence, colour_accuracy, shape_accuracy;
- label_adherence: the label classifier fit on the processed training images (pipeline.evaluation.label_adherence),
  on the prompts that are labels;
- clip_score: CLIP score with `evaluate.clip_model` (pipeline.evaluation.external_metrics).

Each is built once, before training, and refuses to start (naming train.sample_metric) when it could score none
of the prompts.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from pipeline.contracts.paths import Paths
from pipeline.core.config import SAMPLE_METRIC_NAMES, ConfigError, EvaluateParams
from pipeline.data.shapes import SHAPE_PROMPTS
from pipeline.evaluation.external_metrics import load_clip_score
from pipeline.evaluation.label_adherence import label_judge
from pipeline.evaluation.shape_adherence import shape_adherence_metrics

Judge = Callable[[list[list[Image.Image]], list[str]], dict[str, float]]


def sample_judge(metric: str | None, evaluate: EvaluateParams, paths: Paths, prompts: list[str]) -> Judge | None:
    """The scorer of images per prompt for train.sample_metric `metric` (None: no metric)."""
    if metric is None:
        return None
    if metric == "adherence":
        return adherence_judge(prompts)
    if metric == "label_adherence":
        judge, why_not = label_judge(paths, prompts, evaluate)
        if judge is None:
            raise ConfigError(f"train.sample_metric: label_adherence cannot score the samples: {why_not}")
        return lambda rows, shown: {"label_adherence": judge(rows, shown)["label_adherence"]}
    if evaluate.clip_model is None:
        raise ConfigError("train.sample_metric: clip_score needs evaluate.clip_model (a local CLIP folder or a "
                          "cached hub id)")
    scorer, why_not = load_clip_score(evaluate.clip_model, paths.root)
    if scorer is None:
        raise ConfigError(f"train.sample_metric: clip_score: {why_not}")
    return lambda rows, shown: {"clip_score": scorer([image for row in rows for image in row],
                                                     [prompt for prompt, row in zip(shown, rows, strict=True)
                                                      for _ in row])}


def adherence_judge(prompts: list[str]) -> Judge:
    if not set(prompts) & set(SHAPE_PROMPTS):
        raise ConfigError(f"train.sample_metric: adherence reads colour-and-shape prompts ('a red circle'); none of "
                          f"the sampled prompts {prompts[:4]} is one")
    names = SAMPLE_METRIC_NAMES["adherence"]
    return lambda rows, shown: {name: value for name, value in shape_adherence_metrics(rows, shown).items()
                                if name in names}
