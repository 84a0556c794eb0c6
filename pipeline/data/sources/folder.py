"""A folder of images, captioned the ways image folders are captioned in the wild.

For each image the first of these that applies gives the caption:
1. imagefolder metadata: a `metadata.jsonl` or `metadata.csv` with `file_name` (relative to the
   metadata file) and the caption column `caption_column` (the Hugging Face `imagefolder` layout);
2. a sidecar caption file beside the image: `photo.jpg` + `photo.txt` (kohya style, `caption_extension`);
3. the class sub-folder: `cats/1.jpg` gets `label_template` with `{label}` = `cats`;
4. nothing: the caption is "" and the image trains the unconditional branch.
An image's mask file is beside it, named by `mask_suffix` (`photo.jpg` + `photo-masklabel.png`); mask files are
never images themselves.
Files are only listed and stat'ed here; their bytes are read by the ingest stage when new or changed.
An image that is a link leading outside the folder, or whose caption file is not UTF-8, is rejected
with its reason; the others go on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.core.source_params import FolderSource
from pipeline.data.sources import Rejected, SourceError, SourceItem, caption_text, file_item, path_inside
from pipeline.data.sources.tables import read_rows, require_column

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_NAME = "file_name"


class CaptionError(ValueError):
    """One image's caption cannot be read: that image is rejected, the others go on."""


def items(settings: FolderSource, root: Path) -> Iterator[SourceItem | Rejected]:
    root = root.resolve()
    if not root.is_dir():
        raise SourceError(f"ingest.folder.path: {root} is not a folder")
    captions, rejected = metadata_captions(root, settings.caption_column)
    yield from rejected
    listed = {name: root / name for name in captions}
    found = {path.relative_to(root).as_posix(): path
             for path in image_files(root, settings.extensions, settings.mask_suffix)}
    for name in sorted(listed.keys() | found.keys()):
        path = listed.get(name) or found[name]
        if path_inside(root, path) is None:
            yield Rejected(name, f"a link that leads outside the data folder, to {path.resolve()}")
            continue
        try:
            caption = captions[name] if name in captions else fallback_caption(path, root, settings)
        except CaptionError as error:
            yield Rejected(name, str(error))
            continue
        mask = mask_file(path, settings.mask_suffix)
        if mask and path_inside(root, mask) is None:
            yield Rejected(name, f"its mask file {mask.name} is a link that leads outside the data folder")
            continue
        yield file_item(name, path, caption, mask)


def image_files(root: Path, extensions: tuple[str, ...], mask_suffix: str) -> Iterator[Path]:
    """Image files under root by extension, skipping hidden files and folders (.git, .ipynb_checkpoints) and
    mask files."""
    for path in root.rglob("*"):
        if (not is_hidden(path, root) and path.suffix.lower() in extensions and not path.name.endswith(mask_suffix)
                and path.is_file()):
            yield path


def mask_file(image: Path, mask_suffix: str) -> Path | None:
    """The image's mask file, if there is one beside it."""
    mask = image.with_name(image.stem + mask_suffix)
    return mask if mask.is_file() else None


def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def metadata_captions(root: Path, caption_column: str) -> tuple[dict[str, str], list[Rejected]]:
    """Captions from every metadata file under root, keyed by the image's path relative to root."""
    captions: dict[str, str] = {}
    rejected: list[Rejected] = []
    found = (path for name in METADATA_FILES for path in root.rglob(name) if not is_hidden(path, root))
    for metadata in sorted(found):
        rows = read_rows(metadata)
        require_column(rows, FILE_NAME, metadata, "the imagefolder layout")
        require_column(rows, caption_column, metadata, "ingest.folder.caption_column")
        where = metadata.relative_to(root).as_posix()
        for number, row in enumerate(rows, start=1):
            listed = caption_text(row.get(FILE_NAME))
            path = path_inside(root, metadata.parent / listed) if listed else None
            problem = listing_problem(listed, path)
            if problem:
                rejected.append(Rejected(listed or f"{where} row {number}", f"{where} row {number}: {problem}"))
                continue
            captions[path.relative_to(root).as_posix()] = caption_text(row.get(caption_column))
    return captions, rejected


def listing_problem(listed: str, path: Path | None) -> str:
    """Why a listed file cannot be ingested, or '' when it can."""
    if not listed:
        return f"empty {FILE_NAME}"
    if path is None:
        return f"{FILE_NAME} {listed!r} points outside the data folder"
    if not path.is_file():
        return f"file not found: {listed}"
    return ""


def fallback_caption(path: Path, root: Path, settings: FolderSource) -> str:
    """The caption of an image no metadata lists: its sidecar file, else its class sub-folder, else ''."""
    sidecar = path.with_suffix(settings.caption_extension)
    if sidecar.is_file():
        try:
            return caption_text(sidecar.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            # Rejected rather than decoded with replacement characters, which would train on garbage tokens.
            raise CaptionError(
                f"caption file {sidecar.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if settings.label_template and path.parent != root:
        return settings.label_template.format(label=path.parent.name.replace("_", " "))
    return ""
