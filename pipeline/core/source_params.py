"""params.yaml's ingest section: where the images come from, one typed section per kind of source."""

from __future__ import annotations

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


class FolderSource(Section):
    """A folder of images: imagefolder metadata, sidecar caption files or class sub-folders."""

    path: str = Field(description="the folder, relative to the project root unless absolute")
    caption_column: str = Field("text", description="caption column of metadata.jsonl / metadata.csv")
    caption_extension: str = Field(".txt", description="sidecar caption file: photo.jpg + photo.txt")
    label_template: str | None = Field("a photo of a {label}", description="caption for class sub-folders")
    extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, description="image files read, by extension (any case)")

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
LOCATION_KEY = {"folder": "path", "manifest": "path", "hf": "path_or_id", "webdataset": "path"}  # where each reads


class IngestParams(Section):
    """Where the images come from (pipeline/stages/ingest.py): one source, copied into data/raw."""

    source: Literal[SOURCES] = Field("synthetic", description="the source read: its section below must be set "
                                                              "(synthetic has defaults)")
    synthetic: SyntheticSource = Field(SyntheticSource(), description="the rendered shapes")
    folder: FolderSource | None = Field(None, description="a folder of images, with imagefolder metadata, "
                                                          "sidecar caption files or class sub-folders")
    manifest: ManifestSource | None = Field(None, description="a CSV, Parquet or JSONL file of image paths and captions")
    hf: HfSource | None = Field(None, description="a Hugging Face dataset, saved to disk or on the hub")
    webdataset: WebdatasetSource | None = Field(None, description="img2dataset's .tar shards")
    shard_size: int = Field(1000, ge=1, description="images per data/raw shard; a run's new images fill new shards")

    @model_validator(mode="after")
    def _chosen_source_is_configured(self) -> IngestParams:
        if self.source != "synthetic" and getattr(self, self.source) is None:
            raise PydanticCustomError("missing_setting", "ingest.{key}: required when ingest.source is {source}",
                                      {"key": f"{self.source}.{LOCATION_KEY[self.source]}", "source": self.source})
        return self

    def location(self) -> str | None:
        """Where the configured source reads, as params.yaml writes it; None for the rendered shapes."""
        key = LOCATION_KEY.get(self.source)
        return getattr(getattr(self, self.source), key) if key else None
