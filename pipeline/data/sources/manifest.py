"""A manifest file (CSV, Parquet or JSONL) listing image paths, relative to the manifest, with captions.

Rows that cannot become samples are rejected with their row number and reason instead of stopping the
stage: an empty path, a path that leads outside the manifest's folder (`../`, absolute, a link), a
missing file. A missing or empty caption makes an unconditional sample. With `mask_column`, a row's mask file
(relative to the manifest, like the image; an empty cell: no mask) goes with its image, under the same rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.core.source_params import ManifestSource
from pipeline.data.sources import Rejected, SourceError, SourceItem, caption_text, file_item, path_inside
from pipeline.data.sources.tables import read_rows, require_column


def items(settings: ManifestSource, manifest: Path) -> Iterator[SourceItem | Rejected]:
    if not manifest.is_file():
        raise SourceError(f"ingest.manifest.path: {manifest} is not a file")
    rows = read_rows(manifest)
    require_column(rows, settings.path_column, manifest, "ingest.manifest.path_column")
    require_column(rows, settings.caption_column, manifest, "ingest.manifest.caption_column")
    if settings.mask_column:
        require_column(rows, settings.mask_column, manifest, "ingest.manifest.mask_column")
    root = manifest.parent.resolve()
    for number, row in enumerate(rows, start=1):
        listed = caption_text(row.get(settings.path_column))
        where = f"{manifest.name} row {number}"
        if not listed:
            yield Rejected(where, f"{where}: empty {settings.path_column!r}")
            continue
        masked = caption_text(row.get(settings.mask_column)) if settings.mask_column else ""
        problem = file_problem(root, listed) or (masked and file_problem(root, masked, "mask "))
        if problem:
            yield Rejected(listed, f"{where}: {problem}")
            continue
        path = (root / listed).resolve()
        yield file_item(path.relative_to(root).as_posix(), path, caption_text(row.get(settings.caption_column)),
                        (root / masked).resolve() if masked else None)


def file_problem(root: Path, listed: str, kind: str = "") -> str:
    """Why a listed file cannot be read, or '' when it can."""
    path = path_inside(root, root / listed)
    if path is None:
        return f"{kind}path {listed!r} leads outside the manifest's folder {root}"
    if not path.is_file():
        return f"{kind}file not found: {root / listed}"
    return ""
