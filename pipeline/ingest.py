"""Stage `ingest`: bring samples from the configured source into data/raw with a manifest; incremental.

Writes into data/raw:
- images/<sha256>.<ext>: each distinct content once, named by the sha256 of its bytes (the sample id);
- manifest.parquet: one row per sample: id, path (relative to data/raw), caption ("" for an
  unconditional sample), width, height, format, bytes, source, origin (its name in the source);
- rejected.parquet: what the source offered but could not be ingested (origin, reason), for validation;
- index.json: the source's signature and, per item name, its change stamp and content id.

Batches the retraining flow merged into data/batches/ are ingested after the source's own items.

A re-run reads only items that are new or whose stamp (size and mtime for files) changed; the rest keep
their rows, with captions refreshed from the source. Content already ingested under another name is a
duplicate: reported with both names and stored once. When the source itself changes (another kind,
folder or settings) the manifest starts afresh. Source files are only ever read.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_file, read_json, write_json
from pipeline.config import FolderSource, IngestParams
from pipeline.contracts.paths import Paths
from pipeline.contracts.data import MANIFEST, RAW_MANIFEST_COLUMNS, REJECTED, REJECTED_COLUMNS
from pipeline.contracts.paths import Paths
from pipeline.images import content_id, describe_image
from pipeline.sources import Rejected, SourceError, SourceItem, folder, hf, manifest, synthetic

log = logging.getLogger(__name__)

INDEX = "index.json"
IMAGES_DIR = "images"
BATCHES_PREFIX = "batches/"


@dataclass(frozen=True)
class IngestResult:
    new: int  # samples added by this run (new files, and files whose content changed)
    unchanged: int  # already in the manifest and, where a stamp allowed it, not read again
    read: int  # items whose bytes this run read
    duplicates: tuple[tuple[str, str], ...]  # (name, name of the copy already ingested)
    rejected: tuple[Rejected, ...]
    total: int  # rows in the manifest
    unconditional: int  # rows with an empty caption
    manifest: Path


def open_source(params: IngestParams, paths: Paths) -> tuple[str, Iterator[SourceItem | Rejected]]:
    """The configured source's signature (what it is and where) and its items."""
    if params.source == "folder":
        root = paths.resolve(params.folder.path)
        if paths.raw.is_relative_to(root):
            # Otherwise every run would walk its own outputs (and the processed data) as new input.
            raise SourceError(f"ingest.folder.path: {root} contains the pipeline's {paths.raw}; "
                              "point it at the folder of source images, such as data/images")
        return f"folder {root}", folder.items(params.folder, root)
    if params.source == "manifest":
        path = paths.resolve(params.manifest.path)
        return f"manifest {path}", manifest.items(params.manifest, path)
    if params.source == "hf":
        location = hf.locate(params.hf.path_or_id, paths.resolve(params.hf.path_or_id))
        return f"hf {location} split={params.hf.split}", hf.items(params.hf, location)
    return f"synthetic {params.synthetic.model_dump_json()}", synthetic.items(params.synthetic)


@dataclass
class Ingestion:
    """One run over a source: the manifest rows and index carried over from earlier runs, and tallies."""

    raw: Path
    source: str
    rows: dict[str, dict] = field(default_factory=dict)  # by sample id, in manifest order
    index: dict[str, dict] = field(default_factory=dict)  # by item name: {"stamp", "id"}
    supplied_by: dict[str, str] = field(default_factory=dict)  # sample id -> item name, this run
    new: int = 0
    unchanged: int = 0
    read: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def take(self, item: SourceItem | Rejected) -> None:
        if isinstance(item, Rejected):
            self.reject(item)
            return
        known = self.index.get(item.name)
        if known and item.stamp is not None and known["stamp"] == item.stamp and known["id"] in self.rows:
            self.seen_again(item, known["id"])
            return
        self.read_item(item, previous_id=known["id"] if known else None)

    def read_item(self, item: SourceItem, previous_id: str | None) -> None:
        try:
            data = item.read()
        except OSError as exc:
            self.reject(Rejected(item.name, f"cannot be read: {exc.strerror or exc}"))
            return
        self.read += 1
        if not data:
            self.reject(Rejected(item.name, "empty file (0 bytes)"))
            return
        try:
            width, height, fmt = describe_image(data)
        except (OSError, ValueError) as exc:
            self.reject(Rejected(item.name, f"not an image Pillow can open ({type(exc).__name__})"))
            return
        sample_id = content_id(data)
        self.index[item.name] = {"stamp": item.stamp, "id": sample_id}
        if previous_id not in (None, sample_id) and self.rows.get(previous_id, {}).get("origin") == item.name:
            # Edited in place: the new content replaces the old row (the old file stays in images/).
            del self.rows[previous_id]
        if sample_id in self.rows:
            self.seen_again(item, sample_id)
            return
        relative = f"{IMAGES_DIR}/{sample_id}.{fmt}"
        store_image(self.raw / relative, data)
        self.rows[sample_id] = dict(id=sample_id, path=relative, caption=item.caption, width=width,
                                    height=height, format=fmt, bytes=len(data), source=self.source,
                                    origin=item.name)
        self.supplied_by[sample_id] = item.name
        self.new += 1

    def seen_again(self, item: SourceItem, sample_id: str) -> None:
        """Content already in the manifest: the same item again, or a duplicate under another name."""
        row = self.rows[sample_id]
        first = self.supplied_by.get(sample_id, row["origin"])
        if sample_id in self.supplied_by or row["origin"] != item.name:
            self.duplicates.append((item.name, first))
            log.info("ingest: duplicate: %s has the same content as %s; stored once", item.name, first)
            return
        row["caption"] = item.caption  # the source may have re-captioned an unchanged image
        self.supplied_by[sample_id] = item.name
        self.unchanged += 1

    def reject(self, rejected: Rejected) -> None:
        log.warning("ingest: rejected %s: %s", rejected.name, rejected.reason)
        self.rejected.append(rejected)


def store_image(target: Path, data: bytes) -> None:
    """Content-addressed: a file already there has exactly these bytes."""
    if not target.exists():
        with atomic_file(target) as staging:
            staging.write_bytes(data)


def carried_over(raw: Path, signature: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """Manifest rows by id and the item index of the previous run, when it read the same source."""
    if not (raw / INDEX).is_file() or not (raw / MANIFEST).is_file():
        return {}, {}
    saved = read_json(raw / INDEX)
    if saved.get("signature") != signature:
        log.info("ingest: the source changed (was: %s): starting a new manifest; %s keeps its files",
                 saved.get("signature"), raw / IMAGES_DIR)
        return {}, {}
    rows = pd.read_parquet(raw / MANIFEST).to_dict(orient="records")
    return {row["id"]: row for row in rows}, saved["items"]


def save(run: Ingestion, signature: str) -> pd.DataFrame:
    """Manifest and rejects first, index last: a crash in between only makes the next run re-read."""
    frame = pd.DataFrame(list(run.rows.values()), columns=list(RAW_MANIFEST_COLUMNS))
    with atomic_file(run.raw / MANIFEST) as staging:
        frame.to_parquet(staging, index=False)
    rejected = pd.DataFrame([(r.name, r.reason) for r in run.rejected], columns=list(REJECTED_COLUMNS))
    with atomic_file(run.raw / REJECTED) as staging:
        rejected.to_parquet(staging, index=False)
    write_json(run.raw / INDEX, {"signature": signature, "items": run.index})
    return frame


def merged_batches(paths: Paths) -> Iterator[SourceItem | Rejected]:
    """Batches the retraining flow accepted (data/batches/<batch>/, imagefolder layout): they add to
    whatever the configured source gives, named `batches/<batch>/<file>`."""
    if not paths.batches.is_dir():
        return
    for item in folder.items(FolderSource(path=str(paths.batches), label_template=None), paths.batches):
        yield replace(item, name=f"{BATCHES_PREFIX}{item.name}")


def ingest(params: IngestParams, paths: Paths) -> IngestResult:
    signature, source_items = open_source(params, paths)
    items = itertools.chain(source_items, merged_batches(paths))
    rows, index = carried_over(paths.raw, signature)
    run = Ingestion(paths.raw, params.source, rows, index)
    (paths.raw / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for item in items:
        run.take(item)
    frame = save(run, signature)
    unconditional = int((frame["caption"] == "").sum())
    log.info(
        "ingest: %d new, %d unchanged, %d read, %d duplicates, %d rejected; the manifest holds %d samples "
        "from %s, %d of them unconditional (empty caption)",
        run.new, run.unchanged, run.read, len(run.duplicates), len(run.rejected), len(frame), params.source,
        unconditional,
    )
    return IngestResult(run.new, run.unchanged, run.read, tuple(run.duplicates), tuple(run.rejected),
                        len(frame), unconditional, paths.raw / MANIFEST)
