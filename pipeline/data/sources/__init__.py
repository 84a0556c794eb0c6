"""Ingestion sources: each yields the same records for the ingest stage.

A source lists what it offers as `SourceItem`s (a stable name, a caption, a way to read the bytes and,
for files, a cheap change stamp) and what it cannot offer as `Rejected` (a name and the reason), so a
bad row or file is reported instead of stopping the stage. The bytes are read only when the ingest
stage has not seen the item's stamp before, which is what makes re-runs incremental.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.source_params import IMPLICIT_SUBSET


class SourceError(UserError, ValueError):
    """Source input that cannot be used at all; the message names the file, the key or the row."""


@dataclass(frozen=True)
class SourceItem:
    name: str  # stable within the source (a relative path, a row): the index key and what reports show
    caption: str  # "" is an unconditional sample (the classifier-free-guidance branch)
    read: Callable[[], bytes]
    stamp: str | None = None  # changes whenever the bytes may have; None means "always read"
    subset: str = IMPLICIT_SUBSET  # the named subset (ingest.subsets) the item belongs to
    mask: Path | None = None  # the image's mask file, where the source pairs one with it


@dataclass(frozen=True)
class Rejected:
    name: str
    reason: str


def file_item(name: str, path: Path, caption: str, mask: Path | None = None) -> SourceItem:
    """An item backed by a file, and by its mask file if it has one; size and modification time stand in for
    their content until either changes."""
    stamp = file_stamp(path) + (f"|mask {file_stamp(mask)}" if mask else "")
    return SourceItem(name, caption, path.read_bytes, stamp, mask=mask)


def file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def path_inside(root: Path, path: Path) -> Path | None:
    """`path` resolved, or None when it leads outside `root` (through `../`, an absolute path or a link)."""
    resolved = path.resolve()
    return resolved if resolved.is_relative_to(root.resolve()) else None


def caption_text(value: object) -> str:
    """A caption cell as text: missing values (None, NaN, NA) are unconditional samples, ''."""
    if value is None or value != value:  # NaN is the only value not equal to itself
        return ""
    return str(value).strip()
