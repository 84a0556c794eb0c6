"""Sample metrics that need weights sdpipe cannot train itself: FID and KID (Inception) and CLIP score.

They are computed with torchmetrics only when the weights are already on this machine; nothing is
downloaded behind the user's back. When weights are missing, `unavailable()` says why in plain words
and no number is reported.

- FID/KID use the TorchScript FID Inception network `inception-2015-12-05.pt` (the one StyleGAN and
  clean-fid use, called as `network(images_0_255_at_299px, return_features=True)` -> 2048 features),
  from `evaluate.inception_weights` or, when that is unset, torch's hub cache.
- CLIP score uses `evaluate.clip_model`: a local folder or a hub id in the local Hugging Face cache
  (a transformers CLIPModel + CLIPProcessor, e.g. openai/clip-vit-large-patch14).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError, EvaluateParams

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048


def inception_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(configured: str | None, root: Path) -> Path | None:
    """The configured file (which must exist), else the hub cache's copy, else None."""
    if configured:
        path = Paths(root).resolve(configured)
        if not path.is_file():
            raise ConfigError(f"evaluate.inception_weights: {path} does not exist")
        return path
    cached = inception_cache_path()
    return cached if cached.is_file() else None


class InceptionFeatures(torch.nn.Module):
    """uint8 NCHW images of any size -> the FID Inception's pool features."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        resized = torch.nn.functional.interpolate(
            images.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
        )
        return self.network(resized, return_features=True).double()


class _PrecomputedFeatures(torch.nn.Module):
    """Lets torchmetrics' FID and KID take features computed once, instead of running Inception twice."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def to_uint8_batch(images: list[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images or an NHWC uint8 array -> an NCHW uint8 tensor."""
    array = np.stack([np.asarray(image.convert("RGB")) for image in images]) if isinstance(images, list) else images
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


@dataclass
class ExternalMetrics:
    """Scores one set of generated images against the validation images and their prompts."""

    inception: InceptionFeatures | None = None
    real_features: torch.Tensor | None = None
    clip: ClipScore | None = None
    kid_subset_size: int = 50
    seed: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)

    def score(self, images: list[Image.Image], prompts: list[str]) -> dict[str, float]:
        metrics = {}
        batch = to_uint8_batch(images)
        if self.inception is not None:
            metrics.update(self._fid_kid(self.inception(batch)))
        if self.clip is not None:
            metrics["clip_score"] = self.clip(images, prompts)
        return metrics

    def _fid_kid(self, fake_features: torch.Tensor) -> dict[str, float]:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        features = _PrecomputedFeatures(fake_features.shape[1])
        fid = FrechetInceptionDistance(feature=features)
        subset = min(self.kid_subset_size, len(fake_features), len(self.real_features))
        kid = KernelInceptionDistance(feature=features, subset_size=subset)
        for metric in (fid, kid):
            metric.update(self.real_features, real=True)
            metric.update(fake_features, real=False)
        torch.manual_seed(self.seed)  # KID draws random subsets: fixed so a rerun gives the same number
        kid_mean, _ = kid.compute()
        return dict(fid=float(fid.compute()), kid=float(kid_mean))


class ClipScore:
    """CLIP score (Hessel et al. 2021): 100 x max(cosine(image, prompt), 0), averaged over the images.

    Computed with transformers directly: torchmetrics 1.9's CLIPScore expects transformers 4, whose
    `get_image_features` returned a tensor.
    """

    def __init__(self, source: str):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(source).eval()
        self.processor = CLIPProcessor.from_pretrained(source)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> float:
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        output = self.model(**inputs)  # image_embeds and text_embeds come L2-normalised
        cosine = (output.image_embeds * output.text_embeds).sum(dim=-1)
        return float((100 * cosine.clamp(min=0)).mean())


def load_clip_score(model: str, root: Path) -> tuple[ClipScore | None, str | None]:
    """The CLIP scorer for a local folder or cached hub id; (None, why) when it cannot be loaded."""
    local = Paths(root).input(model)
    try:
        return ClipScore(str(local) if local.exists() else model), None
    except OSError as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, f"evaluate.clip_model {model!r} is neither a local folder nor a cached hub model ({detail})"


def external_metrics(params: EvaluateParams, root: Path, real_images: Iterable[np.ndarray]) -> ExternalMetrics:
    """Whatever of FID, KID and CLIP score this machine can compute, and why not for the rest. The real
    images (uint8 NHWC chunks) are read only when there are Inception weights to measure them with."""
    scorer = ExternalMetrics(kid_subset_size=params.kid_subset_size, seed=params.sample_seed)
    weights = find_inception_weights(params.inception_weights, root)
    if weights is None:
        reason = (
            f"no Inception weights: set evaluate.inception_weights to the TorchScript {INCEPTION_FILE} "
            f"or place it at {inception_cache_path()}; nothing was downloaded"
        )
        scorer.unavailable.update(fid=reason, kid=reason)
    else:
        scorer.inception = InceptionFeatures(torch.jit.load(str(weights), map_location="cpu"))
        scorer.real_features = torch.cat([scorer.inception(to_uint8_batch(chunk)) for chunk in real_images])
    if params.clip_model is None:
        scorer.unavailable["clip_score"] = "evaluate.clip_model is not set"
    else:
        scorer.clip, reason = load_clip_score(params.clip_model, root)
        if reason:
            scorer.unavailable["clip_score"] = reason
    return scorer
