"""A Hugging Face dataset: a folder written by `datasets.save_to_disk`, or a hub id (needs the network).

Images are read as their stored bytes (the `Image` feature with decode=False), never decoded here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.core.source_params import HfSource
from pipeline.data.sources import SourceError, SourceItem, caption_text


def locate(path_or_id: str, local: Path) -> Path | str:
    """The saved dataset folder when `local` (path_or_id resolved against the project root) exists,
    else the hub id; a value written as a path (./, ../, /, ~) must exist."""
    if local.exists():
        return local
    if path_or_id.startswith((".", "/", "~")):
        raise SourceError(f"ingest.hf.path_or_id: {local} does not exist (expected a folder written by "
                          "datasets.save_to_disk, or a hub id such as 'owner/name')")
    return path_or_id


def load(settings: HfSource, location: Path | str):
    """The chosen split, from disk when `location` is a folder, else from the hub (or its local cache)."""
    import datasets

    if isinstance(location, Path):
        try:
            loaded = datasets.load_from_disk(str(location))
        except FileNotFoundError as exc:
            raise SourceError(f"ingest.hf.path_or_id: {location} is not a dataset written by "
                              f"datasets.save_to_disk ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if settings.split not in loaded:
                raise SourceError(f"ingest.hf.split: {settings.split!r} is not a split of {location} "
                                  f"(splits: {sorted(loaded)})")
            return loaded[settings.split]
        return loaded
    try:
        return datasets.load_dataset(location, split=settings.split)
    except Exception as exc:  # offline, unknown id, no such split: all end here with the cause
        raise SourceError(f"ingest.hf.path_or_id: cannot load {location!r} (split {settings.split!r}) "
                          f"from the Hugging Face hub or its cache: {exc}") from None


def items(settings: HfSource, location: Path | str) -> Iterator[SourceItem]:
    import datasets

    dataset = load(settings, location)
    for column, key in ((settings.image_column, "ingest.hf.image_column"),
                        (settings.caption_column, "ingest.hf.caption_column")):
        if column not in dataset.column_names:
            raise SourceError(f"{key}: no column {column!r} in {location} (columns: {dataset.column_names})")
    if not isinstance(dataset.features[settings.image_column], datasets.Image):
        raise SourceError(f"ingest.hf.image_column: column {settings.image_column!r} in {location} is "
                          f"{dataset.features[settings.image_column]}, not an Image feature")
    images = dataset.select_columns([settings.image_column]).cast_column(
        settings.image_column, datasets.Image(decode=False)
    )
    stamp = files_stamp(dataset)
    for row, caption in enumerate(dataset[settings.caption_column]):
        yield SourceItem(f"row {row}", caption_text(caption), _reader(images, row, settings.image_column), stamp)


def files_stamp(dataset) -> str | None:
    """Size and modification time of the Arrow files behind the dataset: any change to its rows changes
    them, so they stamp every row of an unchanged dataset. None (always read) for an in-memory dataset."""
    files = [Path(entry["filename"]) for entry in dataset.cache_files]
    if not files:
        return None
    return ";".join(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in files)


def _reader(images, row: int, column: str):
    def read() -> bytes:
        stored = images[row][column]
        if stored is None:
            raise OSError(f"row {row} has no image")
        if stored["bytes"] is not None:
            return stored["bytes"]
        return Path(stored["path"]).read_bytes()  # a dataset that keeps paths to local files

    return read
