"""params.yaml's ingest section: where the images come from, one typed section per kind of source."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.core.section import Section, in_order


class SyntheticSource(Section):
    """The embedded data set: captioned coloured shapes ("a red circle") rendered here, no download."""

    count: int = Field(3000, ge=1, description="images rendered; the same seed renders the same first images")
    resolution: int = Field(32, ge=8, description="side of the rendered square images, in pixels")
    seed: int = Field(0, description="seeds the shapes, colours, sizes and positions")
    min_size: float = Field(0.4, gt=0, le=1, description="smallest shape, as a share of the image side")
    max_size: float = Field(0.8, gt=0, le=1, description="largest shape, as a share of the image side")

    _sizes_in_order = in_order("ingest.synthetic", ("min_size", "max_size"))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_SUFFIX = "-masklabel.png"


class FolderSource(Section):
    """A folder of images: imagefolder metadata, sidecar caption files or class sub-folders."""

    path: str = Field(description="the folder, relative to the project root unless absolute")
    caption_column: str = Field("text", description="caption column of metadata.jsonl / metadata.csv")
    caption_extension: str = Field(".txt", description="sidecar caption file: photo.jpg + photo.txt")
    label_template: str | None = Field("a photo of a {label}", description="caption for class sub-folders")
    extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, description="image files read, by extension (any case)")
    mask_suffix: str = Field(MASK_SUFFIX, description="mask file beside an image: photo.jpg + photo-masklabel.png "
                                                     "(OneTrainer's name; white trains, black is ignored)")

    @field_validator("caption_extension")
    @classmethod
    def _is_an_extension(cls, value: str) -> str:
        if not value.startswith("."):
            raise ValueError("must start with a dot, like .txt")
        return value

    @field_validator("extensions")
    @classmethod
    def _are_extensions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(extension.startswith(".") for extension in value):
            raise ValueError("must list at least one extension, each starting with a dot, like .png")
        return tuple(extension.lower() for extension in value)

    @field_validator("mask_suffix")
    @classmethod
    def _is_a_file_ending(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty (every file would be a mask), like -masklabel.png")
        return value

    @field_validator("label_template")
    @classmethod
    def _names_the_label(cls, value: str | None) -> str | None:
        if value is not None and "{label}" not in value:
            raise ValueError("must contain {label} (the sub-folder name), or be null to turn labels off")
        return value


class ManifestSource(Section):
    """A CSV, Parquet or JSONL file of image paths (relative to the file) and captions."""

    path: str = Field(description="the manifest file, relative to the project root unless absolute")
    path_column: str = Field("path", description="column of image paths, relative to the manifest file")
    caption_column: str = Field("text", description="column of captions")
    mask_column: str | None = Field(None, description="column of mask files (relative to the manifest; empty: no "
                                                      "mask), white trains and black is ignored")


class HfSource(Section):
    """A dataset saved with `datasets.save_to_disk`, or a hub id (needs the network)."""

    path_or_id: str = Field(description="a `save_to_disk` folder, relative to the project root unless absolute, "
                                        "or a hub id")
    split: str = Field("train", description="the split read")
    image_column: str = Field("image", description="column of images (datasets' Image feature)")
    caption_column: str = Field("text", description="column of captions")


class WebdatasetSource(Section):
    """img2dataset's webdataset output: .tar shards of {key}.jpg|png|webp + {key}.txt + {key}.json."""

    path: str = Field(description="a folder of .tar shards, a glob (data/shards/*.tar) or an fsspec URL "
                                  "(s3://bucket/shards/); local paths are relative to the project root unless absolute")


SOURCES = ("synthetic", "folder", "manifest", "hf", "webdataset")
SUBSETS = "subsets"  # ingest.source naming several named subsets instead of one source
LOCATION_KEY = {"folder": "path", "manifest": "path", "hf": "path_or_id", "webdataset": "path"}  # where each reads
IMPLICIT_SUBSET = "default"  # the one subset of a run whose ingest.source is a single source
SUBSET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # a manifest value and a prefix of item names
TRIGGER = "{trigger}"  # replaced by ingest.trigger in a subset's captions


def with_trigger(prompts: list[str], trigger: str | None) -> list[str]:
    """Prompts with `{trigger}` replaced by ingest.trigger (config refuses {trigger} without one)."""
    return [prompt.replace(TRIGGER, trigger) if trigger is not None else prompt for prompt in prompts]


class SourceSections(Section):
    """The source read and one section per kind of source; the chosen one must be set (synthetic has defaults)."""

    source: str = Field(description="the source read")
    synthetic: SyntheticSource = Field(SyntheticSource(), description="the rendered shapes")
    folder: FolderSource | None = Field(None, description="a folder of images, with imagefolder metadata, "
                                                          "sidecar caption files or class sub-folders")
    manifest: ManifestSource | None = Field(None, description="a CSV, Parquet or JSONL file of image paths and captions")
    hf: HfSource | None = Field(None, description="a Hugging Face dataset, saved to disk or on the hub")
    webdataset: WebdatasetSource | None = Field(None, description="img2dataset's .tar shards")

    def unset_source_key(self) -> str | None:
        """The chosen source's location key (`folder.path`) when its section is missing, else None."""
        if self.source in LOCATION_KEY and getattr(self, self.source) is None:
            return f"{self.source}.{LOCATION_KEY[self.source]}"
        return None

    def location(self) -> str | None:
        """Where the chosen source reads, as params.yaml writes it; None for the rendered shapes."""
        key = LOCATION_KEY.get(self.source)
        return getattr(getattr(self, self.source), key) if key else None


class CaptionRule(Section):
    """How a subset's images are captioned: the source's own captions or one instance prompt, then a prefix and a
    suffix, joined by spaces. `{trigger}` anywhere in them (and in the source's captions) becomes ingest.trigger."""

    instance_prompt: str | None = Field(
        None, description="every image's caption, replacing the source's (kohya's class_tokens, SimpleTuner's "
                          "instanceprompt), e.g. 'a photo of {trigger} bag'; null: the source's own captions")
    prefix: str = Field("", description="put before each caption, e.g. '{trigger},'")
    suffix: str = Field("", description="put after each caption, e.g. 'product photo'")

    def names_the_trigger(self) -> bool:
        return any(TRIGGER in part for part in (self.instance_prompt or "", self.prefix, self.suffix))

    def apply(self, caption: str, trigger: str | None) -> str:
        """The caption this rule makes of a source's caption."""
        body = caption if self.instance_prompt is None else self.instance_prompt
        text = " ".join(part.strip() for part in (self.prefix, body, self.suffix) if part.strip())
        return text.replace(TRIGGER, trigger) if trigger is not None else text


class SubsetParams(SourceSections):
    """One named subset of the training images (the user's subject, regularisation images of its class): its own
    source, how its images are captioned, and how often training batches draw from it."""

    source: Literal[SOURCES] = Field(description="the subset's source: its section below must be set "
                                                 "(synthetic has defaults)")
    caption: CaptionRule = Field(CaptionRule(), description="the captions of the subset's images")
    weight: float | None = Field(None, gt=0, description="the subset's share of the samples training draws, "
                                 "relative to the other subsets' weights (set on every subset or on none); null: "
                                 "in proportion to its training images times repeats")
    repeats: int = Field(1, ge=1, description="with weights null: each image counts this many times in the "
                                              "shares (kohya's num_repeats)")


class IngestParams(SourceSections):
    """Where the images come from (pipeline/stages/ingest.py): one source, or several named subsets, copied into
    data/raw."""

    source: Literal[(*SOURCES, SUBSETS)] = Field(
        "synthetic", description="the source read: its section below must be set (synthetic has defaults); "
                                 "subsets: the named subsets of ingest.subsets")
    trigger: str | None = Field(None, description="the word that names the subject (e.g. sks), put where a "
                                                  "subset's caption rule says {trigger}")
    subsets: dict[str, SubsetParams] | None = Field(
        None, description="with source: subsets, the named subsets (e.g. subject: the user's images, class: "
                          "regularisation images), in the order they are ingested")
    shard_size: int = Field(1000, ge=1, description="images per data/raw shard; a run's new images fill new shards")

    @field_validator("trigger")
    @classmethod
    def _is_a_word(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "{" in value or "}" in value):
            raise ValueError("must be a non-empty word without braces, such as sks")
        return value.strip() if value is not None else None

    @field_validator("subsets")
    @classmethod
    def _names_are_simple(cls, value: dict[str, SubsetParams] | None) -> dict[str, SubsetParams] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one subset, or be null")
        for name in value:
            if not SUBSET_NAME.fullmatch(name) or name == IMPLICIT_SUBSET:
                raise ValueError(f"subset name {name!r}: use lower-case letters, digits, _ and - (at most 64), "
                                 f"and not {IMPLICIT_SUBSET!r}, the name of a run without subsets")
        return value

    @model_validator(mode="after")
    def _chosen_source_is_configured(self) -> IngestParams:
        if self.source == SUBSETS:
            self._subsets_are_complete()
        elif self.subsets is not None:
            raise PydanticCustomError("conflicting_setting", "ingest.subsets: read only when ingest.source is "
                                      "subsets (got {source}): set source: subsets, or remove subsets",
                                      {"source": self.source})
        elif key := self.unset_source_key():
            raise PydanticCustomError("missing_setting", "ingest.{key}: required when ingest.source is {source}",
                                      {"key": key, "source": self.source})
        return self

    def _subsets_are_complete(self) -> None:
        if self.subsets is None:
            raise PydanticCustomError("missing_setting", "ingest.subsets: required when ingest.source is subsets", {})
        weighted = [name for name, subset in self.subsets.items() if subset.weight is not None]
        for name, subset in self.subsets.items():
            where = f"ingest.subsets.{name}"
            if key := subset.unset_source_key():
                raise PydanticCustomError("missing_setting", "{where}.{key}: required when {where}.source is {source}",
                                          {"where": where, "key": key, "source": subset.source})
            if subset.caption.names_the_trigger() and self.trigger is None:
                raise PydanticCustomError("missing_setting", "ingest.trigger: required, as {where}.caption names "
                                          "{placeholder}", {"where": where, "placeholder": TRIGGER})
            if weighted and subset.weight is None:
                raise PydanticCustomError("missing_setting", "{where}.weight: required, as ingest.subsets.{other}."
                                          "weight is set (weights are shares: set them on every subset or on none)",
                                          {"where": where, "other": weighted[0]})
            if subset.weight is not None and subset.repeats != 1:
                raise PydanticCustomError("conflicting_setting", "{where}.repeats: counts only when weights are null "
                                          "(the weight is the subset's share already): remove one", {"where": where})

    def sources(self) -> dict[str, SourceSections]:
        """The sources read, by subset name: the named subsets, or the one source as the implicit subset."""
        return dict(self.subsets) if self.source == SUBSETS else {IMPLICIT_SUBSET: self}
