"""The prompts evaluation samples: the user's file, the synthetic shapes, or the validation captions.

- `evaluate.prompts` set: one prompt per line of that file (blank lines skipped), in file order;
- the synthetic source: every colour x shape caption ("a red circle"), which the shapes reader can check;
- otherwise: up to `evaluate.max_prompts` distinct non-empty validation captions, the most frequent first
  (for a labelled set that is its labels), ties broken by a hash of the caption so the choice does not move
  as unrelated captions come and go; shown in alphabetical order, then the empty prompt (the unconditional
  branch), which is what a model trained with caption dropout draws without a caption.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError, EvaluateParams
from pipeline.data.shapes import SHAPE_PROMPTS


def prompts_from_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"evaluate.prompts: {path} does not exist (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"evaluate.prompts: {path} holds no prompt (one prompt per line)")
    return prompts


def _caption_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def prompts_from_captions(captions: Iterable[str], max_prompts: int) -> list[str]:
    counts = Counter(caption for caption in captions if caption)
    chosen = sorted(counts, key=lambda caption: (-counts[caption], _caption_hash(caption)))[:max_prompts]
    return sorted(chosen) + [""]


def evaluation_prompts(params: EvaluateParams, source: str, val_captions: Iterable[str], root: Path) -> list[str]:
    if params.prompts is not None:
        return prompts_from_file(Paths(root).input(params.prompts))
    if source == "synthetic":
        return list(SHAPE_PROMPTS)
    return prompts_from_captions(val_captions, params.max_prompts)
