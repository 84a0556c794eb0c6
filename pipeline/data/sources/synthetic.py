"""The embedded default data set: captioned coloured shapes (`pipeline.data.shapes`), rendered deterministically."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.core.source_params import SyntheticSource
from pipeline.data.shapes import render_samples
from pipeline.data.sources import SourceItem


def items(settings: SyntheticSource) -> Iterator[SourceItem]:
    """The renders as ingest items; there is no file to stamp, and rendering again is cheap. Each is drawn when
    read, in the task that reads it."""
    for number, sample in enumerate(render_samples(**settings.model_dump())):
        yield SourceItem(f"render {number}", sample.caption, sample.read)
