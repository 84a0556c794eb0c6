"""params.yaml's validate section: the thresholds of the validation suite (pipeline/stages/validate.py)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.core.section import Section, in_order
from pipeline.core.source_params import SOURCES


class ValidateParams(Section):
    """Thresholds of the validation suite (pipeline/stages/validate.py); hard checks fail the stage, soft ones
    quarantine the row (the soft keys' descriptions name what is quarantined)."""

    # hard
    min_rows: int = Field(10, ge=1, description="fewer rows fails the stage")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="more quarantined rows fails the stage")
    max_empty_caption_share: dict[str, float] = Field(
        {"default": 0.0}, description="share of rows without a caption allowed, per source; 'default' for others")
    # soft
    min_caption_length: int = Field(1, ge=1, description="characters; a shorter caption that is not empty")
    max_caption_length: int = Field(1000, ge=1, description="characters; a longer caption")
    min_width: int = Field(16, ge=1, description="pixels; a narrower image")
    min_height: int = Field(16, ge=1, description="pixels; a lower image")
    max_width: int = Field(8192, ge=1, description="pixels; a wider image")
    max_height: int = Field(8192, ge=1, description="pixels; a taller image")
    # At most Pillow's own limit, which preprocess decodes under.
    max_pixels: int = Field(50_000_000, ge=1, le=89_478_485, description="larger headers are refused before decoding")
    min_aspect_ratio: float = Field(0.25, gt=0, description="width / height; a narrower image")
    max_aspect_ratio: float = Field(4.0, gt=0, description="width / height; a wider image")
    allowed_formats: tuple[str, ...] = Field(("png", "jpeg", "mpo", "webp", "bmp", "gif", "tiff"),
                                             description="Pillow's format names, lower case; other files")
    allowed_modes: tuple[str, ...] = Field(("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B",
                                            "I;16L", "I"), description="Pillow's colour modes; other images")
    max_near_duplicate_distance: int = Field(4, ge=-1, le=64, description="dHash bits; -1 turns the check off")
    max_near_duplicate_colour_difference: float = Field(
        15.0, ge=0, le=255, description="a dHash candidate is a near-duplicate only if no cell of a 24×24 colour "
        "grid of either image lies further than this (0-255) outside the colours around it in the other")
    near_duplicate_min_side: int = Field(64, ge=9, description="smaller images are too small to hash reliably")
    min_contrast: float = Field(3.0, ge=0, description="largest colour-channel standard deviation; below it is blank")
    min_brightness: float = Field(4.0, ge=0, le=255, description="mean grey level 0-255; a darker image is blank")
    max_brightness: float = Field(252.0, ge=0, le=255, description="mean grey level 0-255; a brighter one is blank")

    _pairs_in_order = in_order("validate", ("min_caption_length", "max_caption_length"), ("min_width", "max_width"),
                               ("min_height", "max_height"), ("min_aspect_ratio", "max_aspect_ratio"),
                               ("min_brightness", "max_brightness"))

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, values: object) -> object:
        if isinstance(values, dict) and "allow_empty_captions" in values:
            raise PydanticCustomError(
                "renamed_key", "validate.allow_empty_captions: replaced by validate.max_empty_caption_share "
                "(for example {folder: 0.3}: the share of a source's rows that may have no caption)", {})
        return values

    @field_validator("max_empty_caption_share")
    @classmethod
    def _shares_per_source(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - {"default", *SOURCES})
        if unknown:
            raise ValueError(f"unknown source {unknown}: use default or one of {', '.join(SOURCES)}")
        if not all(0 <= share <= 1 for share in value.values()):
            raise ValueError("each share must be between 0 and 1")
        return {"default": 0.0} | value

    def empty_caption_share(self, source: str) -> float:
        return self.max_empty_caption_share.get(source, self.max_empty_caption_share["default"])
