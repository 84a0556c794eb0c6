"""The embedded default data set: captioned coloured shapes (`pipeline.shapes`), rendered deterministically."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.config import SyntheticSource
from pipeline.shapes import generate
from pipeline.sources import SourceItem

def items(settings: SyntheticSource) -> Iterator[SourceItem]:
    """The renders as ingest items; there is no file to stamp, and rendering again is cheap. Each is drawn when
    read, in the task that reads it."""
    for number, sample in enumerate(generate(**settings.model_dump())):
        yield SourceItem(f"render {number}", sample.caption, sample.read)
