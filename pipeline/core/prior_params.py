"""params.yaml's train.prior: prior preservation, which keeps a fine-tuned model's idea of the subject's class
(what "a bag" draws) from drifting towards the subject (pipeline/training/prior.py, pipeline/stages/class_images.py)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from pipeline.core.section import Section
from pipeline.core.source_params import SUBSETS, IngestParams

CLASS_IMAGES = "data/class_images"  # where the class_images stage renders, as an ingest folder path names it
NO_PRIOR, IMAGE_PRIOR, PREDICTION_PRIOR = "none", "images", "prediction"


class PriorParams(Section):
    """Prior preservation: none; images (class images rendered by the pretrained model train as the class subset,
    their loss weighted); or prediction (no images: the base model's own prediction for the class prompt is a
    second target)."""

    kind: Literal[NO_PRIOR, IMAGE_PRIOR, PREDICTION_PRIOR] = Field(
        NO_PRIOR, description="none; images: render class images (stage class_images) that train as "
                              "class_subset; prediction: the base model's prediction for each caption with the "
                              "trigger replaced by class_word is a second target (LoRA only, no images)")
    prior_loss_weight: float = Field(1.0, ge=0, description="weight of the class loss beside the subject's "
                                                            "(diffusers' --prior_loss_weight)")
    class_prompt: str | None = Field(None, description="images: the prompt the class images are rendered from "
                                                       "and captioned with, e.g. 'a photo of a bag'")
    class_word: str | None = Field(None, description="prediction: the word that replaces ingest.trigger in each "
                                                     "caption to make the class prompt, e.g. bag")
    class_subset: str = Field("class", description="images: the ingest.subsets entry that reads the class images "
                                                   f"(source folder, path {CLASS_IMAGES})")
    num_class_images: int = Field(100, ge=1, description="images: how many class images are rendered")
    num_inference_steps: int = Field(25, ge=1, description="images: sampler steps per class image")
    guidance_scale: float = Field(4.0, ge=0, description="images: classifier-free guidance of the class images")
    seed: int = Field(0, description="images: class image i is rendered from seed + i")

    @model_validator(mode="after")
    def _kind_has_its_class(self) -> PriorParams:
        if self.kind == IMAGE_PRIOR and not (self.class_prompt or "").strip():
            raise PydanticCustomError("missing_setting", "train.prior.class_prompt: required when train.prior.kind "
                                      "is images (the prompt the class images are rendered from)", {})
        if self.kind == PREDICTION_PRIOR and (self.class_word is None or "{" in self.class_word):
            raise PydanticCustomError("missing_setting", "train.prior.class_word: required when train.prior.kind "
                                      "is prediction (the word that replaces the trigger, e.g. bag; '' drops it)",
                                      {})
        return self

    def class_caption(self, caption: str, trigger: str) -> str:
        """The prediction prior's class prompt of a caption: the trigger, as a whole word, replaced by class_word
        ('a photo of sks' -> 'a photo of bag'), spaces collapsed; a caption without the trigger stays as it is."""
        replaced = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", self.class_word or "", caption)
        return " ".join(replaced.split())


def check_prior_fits(prior: PriorParams, ingest: IngestParams, mode: str, finetune: str) -> None:
    """train.prior against the rest of params.yaml: a prior needs a pretrained base; the prediction prior LoRA
    layers it can switch off and a trigger to replace; the image prior a class subset reading the rendered images."""
    if prior.kind != IMAGE_PRIOR:
        require_no_rendered_subset(prior, ingest)
    if prior.kind == NO_PRIOR:
        return
    if mode != "finetune":
        raise PydanticCustomError("conflicting_setting", "train.prior.kind: {kind} needs a pretrained model to "
                                  "preserve: set model.mode: finetune, or train.prior.kind: none", {"kind": prior.kind})
    if prior.kind == PREDICTION_PRIOR:
        if finetune != "lora":
            raise PydanticCustomError("conflicting_setting", "train.prior.kind: prediction takes the base model's "
                                      "prediction with the LoRA layers switched off: set model.finetune: lora", {})
        if ingest.trigger is None:
            raise PydanticCustomError("missing_setting", "ingest.trigger: required when train.prior.kind is "
                                      "prediction (the word train.prior.class_word replaces)", {})
        return
    subset = (ingest.subsets or {}).get(prior.class_subset) if ingest.source == SUBSETS else None
    where = f"ingest.subsets.{prior.class_subset}"
    if subset is None or subset.source != "folder" or subset.folder.path.rstrip("/") != CLASS_IMAGES:
        raise PydanticCustomError(
            "missing_setting", "{where}: train.prior.kind images trains the rendered class images as this subset: "
            "set ingest.source: subsets and {where}: {example}",
            {"where": where, "example": f"{{source: folder, folder: {{path: {CLASS_IMAGES}}}}}"})


def require_no_rendered_subset(prior: PriorParams, ingest: IngestParams) -> None:
    """A subset reading the rendered class images without the image prior would read an empty folder (the
    class_images stage renders only for it): refused here, naming the subset, rather than by ingest."""
    for name, subset in (ingest.subsets or {}).items() if ingest.source == SUBSETS else ():
        if subset.source == "folder" and subset.folder.path.rstrip("/") == CLASS_IMAGES:
            raise PydanticCustomError(
                "conflicting_setting", "ingest.subsets.{name}: reads {folder}, which only train.prior.kind: images "
                "renders (train.prior.kind is {kind}): remove the subset, or use the image prior",
                {"name": name, "folder": CLASS_IMAGES, "kind": prior.kind})
