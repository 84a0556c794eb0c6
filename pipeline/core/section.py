"""The base of every params.yaml section (pipeline.core.config, pipeline.core.source_params)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
