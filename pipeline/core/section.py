"""The base of every params.yaml section (pipeline.core.config, pipeline.core.source_params)."""

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def in_order(section: str, *pairs: tuple[str, str]):
    """A section's validator that refuses a reversed (smallest, largest) pair, such as validate.min_width above
    validate.max_width: a check that could never pass is a mistake in the file, not a setting."""

    def pairs_in_order(model: Section) -> Section:
        for low, high in pairs:
            if getattr(model, low) > getattr(model, high):
                raise PydanticCustomError(
                    "conflicting_setting", "{section}.{low}: must be at most {section}.{high} ({high_value}) "
                    "(got {low_value})", {"section": section, "low": low, "high": high,
                                          "low_value": getattr(model, low), "high_value": getattr(model, high)})
        return model

    return model_validator(mode="after")(pairs_in_order)
