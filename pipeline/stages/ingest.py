"""Stage `ingest`: bring samples from the configured source into data/raw with a manifest; incremental.

Writes into data/raw:
- shards/raw-<hash>.parquet: the images' bytes (`pipeline.contracts.shards`), each distinct content once,
  under its sample id (the sha256 of its bytes, and of its mask file's where the source pairs one with it: the
  shard's `mask` column, null for images without); each run's new images go into new shards of at most
  `ingest.shard_size`, and shards no manifest row names any more are deleted;
- manifest.parquet: one row per sample: id, shard (relative to data/raw), caption ("" for an
  unconditional sample), width, height, format, bytes, source (its kind), origin (its name in the source),
  subset (`ingest.subsets`' name, or `default` for a run with one source);
- rejected.parquet: what the source offered but could not be ingested (origin, reason), for validation;
- index.json: the source's signature and, per item name, its change stamp and content id.

Batches the retraining flow merged into data/batches/ are ingested after the source's own items.

With `ingest.source: subsets` every named subset is read in turn, its items named `<subset>/<name>` and
captioned by the subset's caption rule (`pipeline.data.sources.configured`); content already taken by an
earlier subset is a duplicate and stays in that subset. A subset left without a sample is an error.

A re-run reads only items that are new or whose stamp (size and mtime for files) changed; the rest keep
their rows, with captions refreshed from the source. Reading, hashing and describing the items to read runs
on Ray (`pipeline.runtime.ray_tasks`), one task per future shard. Content already ingested under another name is a
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
import pyarrow as pa

from pipeline.contracts.data import MANIFEST, RAW_MANIFEST_COLUMNS, REJECTED, REJECTED_COLUMNS
from pipeline.contracts.paths import Paths
from pipeline.contracts.shards import MASK, shard_name, unreferenced_shards, write_shard
from pipeline.core.atomic import atomic_file, read_json, write_json
from pipeline.core.config import RayParams
from pipeline.core.source_params import IMPLICIT_SUBSET, SUBSETS, FolderSource, IngestParams
from pipeline.data.images import content_id, describe_image, mask_problem
from pipeline.data.sources import Rejected, SourceError, SourceItem, folder
from pipeline.data.sources.configured import open_source
from pipeline.runtime.ray_tasks import iter_tasks

log = logging.getLogger(__name__)

INDEX = "index.json"
BATCHES_PREFIX = "batches/"
SHARD_PREFIX = "raw"


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


def read_items(items: list[SourceItem]) -> list[dict]:
    """Read, describe and hash each item (a Ray task): its content id, header and bytes, or why not."""
    return [read_item(item) for item in items]


def read_item(item: SourceItem) -> dict:
    try:
        data = item.read()
        mask = item.mask.read_bytes() if item.mask else None
    except OSError as exc:
        return dict(name=item.name, rejected=f"cannot be read: {exc.strerror or exc}", read=False)
    if not data:
        return dict(name=item.name, rejected="empty file (0 bytes)", read=True)
    try:
        width, height, fmt = describe_image(data)
    except (OSError, ValueError) as exc:
        return dict(name=item.name, rejected=f"not an image Pillow can open ({type(exc).__name__})", read=True)
    problem = mask_problem(data, mask, item.mask.name) if item.mask else ""
    if problem:
        return dict(name=item.name, rejected=problem, read=True)
    return dict(name=item.name, id=content_id(data, mask), data=data, mask=mask, width=width, height=height,
                format=fmt, read=True)


@dataclass
class Ingestion:
    """One run over a source: the manifest rows and index carried over from earlier runs, and tallies."""

    raw: Path
    sources: dict[str, str]  # each subset's kind of source
    rows: dict[str, dict] = field(default_factory=dict)  # by sample id, in manifest order
    index: dict[str, dict] = field(default_factory=dict)  # by item name: {"stamp", "id"}
    supplied_by: dict[str, str] = field(default_factory=dict)  # sample id -> item name, this run
    to_read: list[SourceItem] = field(default_factory=list)
    new: int = 0
    unchanged: int = 0
    read: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def take(self, item: SourceItem | Rejected) -> None:
        """Settle an item from its stamp alone, or queue it to be read."""
        if isinstance(item, Rejected):
            self.reject(item)
            return
        known = self.index.get(item.name)
        if known and item.stamp is not None and known["stamp"] == item.stamp and known["id"] in self.rows:
            self.seen_again(item.name, item.caption, known["id"])
            return
        self.to_read.append(item)

    def store_shard(self, items: list[SourceItem], results: list[dict]) -> None:
        """Take one task's results, in item order, and write the new contents as one shard."""
        contents: dict[str, bytes] = {}
        masks: dict[str, bytes | None] = {}
        for item, result in zip(items, results, strict=True):
            self.read += result["read"]
            if "rejected" in result:
                self.reject(Rejected(item.name, result["rejected"]))
                continue
            if self.take_content(item, result):
                contents[result["id"]], masks[result["id"]] = result["data"], result["mask"]
        if contents:
            shard = shard_name(SHARD_PREFIX, contents)
            has_masks = any(mask is not None for mask in masks.values())
            write_shard(self.raw / shard, list(contents), list(contents.values()),
                        {MASK: pa.array(list(masks.values()), pa.binary())} if has_masks else None)
            for sample_id in contents:
                self.rows[sample_id]["shard"] = shard

    def take_content(self, item: SourceItem, result: dict) -> bool:
        """Record a read item; True when its content is new and must be stored."""
        sample_id = result["id"]
        previous_id = self.index.get(item.name, {}).get("id")
        self.index[item.name] = {"stamp": item.stamp, "id": sample_id}
        if previous_id not in (None, sample_id) and self.rows.get(previous_id, {}).get("origin") == item.name:
            # Edited in place: the new content replaces the old row.
            del self.rows[previous_id]
        if sample_id in self.rows:
            self.seen_again(item.name, item.caption, sample_id)
            return False
        self.rows[sample_id] = dict(id=sample_id, shard=None, caption=item.caption, width=result["width"],
                                    height=result["height"], format=result["format"], bytes=len(result["data"]),
                                    source=self.sources[item.subset], origin=item.name, subset=item.subset)
        self.supplied_by[sample_id] = item.name
        self.new += 1
        return True

    def seen_again(self, name: str, caption: str, sample_id: str) -> None:
        """Content already in the manifest: the same item again, or a duplicate under another name."""
        row = self.rows[sample_id]
        first = self.supplied_by.get(sample_id, row["origin"])
        if sample_id in self.supplied_by or row["origin"] != name:
            self.duplicates.append((name, first))
            log.info("ingest: duplicate: %s has the same content as %s; stored once", name, first)
            return
        row["caption"] = caption  # the source may have re-captioned an unchanged image
        self.supplied_by[sample_id] = name
        self.unchanged += 1

    def reject(self, rejected: Rejected) -> None:
        log.warning("ingest: rejected %s: %s", rejected.name, rejected.reason)
        self.rejected.append(rejected)


def carried_over(raw: Path, signature: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """Manifest rows by id and the item index of the previous run, when it read the same source."""
    if not (raw / INDEX).is_file() or not (raw / MANIFEST).is_file():
        return {}, {}
    saved = read_json(raw / INDEX)
    if saved.get("signature") != signature:
        log.info("ingest: the source changed (was: %s): starting a new manifest", saved.get("signature"))
        return {}, {}
    rows = pd.read_parquet(raw / MANIFEST).to_dict(orient="records")
    if rows and "shard" not in rows[0]:  # written before shards: read every item again
        return {}, {}
    for row in rows:  # written before subsets
        row.setdefault("subset", IMPLICIT_SUBSET)
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
    for stale in unreferenced_shards(run.raw, frame["shard"]):
        stale.unlink()
    return frame


def require_every_subset(frame: pd.DataFrame, params: IngestParams) -> None:
    """A named subset without a sample trains nothing of what it was named for: an error naming it."""
    if params.source != SUBSETS:
        return
    empty = [name for name in params.subsets if not (frame["subset"] == name).any()]
    if empty:
        raise SourceError(f"ingest.subsets.{empty[0]}: its source gave no image that another subset had not "
                          f"already (see {params.subsets[empty[0]].location() or 'its synthetic section'})")


def merged_batches(paths: Paths, params: IngestParams) -> Iterator[SourceItem | Rejected]:
    """Batches the retraining flow accepted (data/batches/<batch>/, imagefolder layout): they add to
    whatever the configured source gives, named `batches/<batch>/<file>`."""
    if not paths.batches.is_dir():
        return
    for item in folder.items(FolderSource(path=str(paths.batches), label_template=None), paths.batches):
        if params.source == SUBSETS:
            raise SourceError(f"ingest.subsets: {paths.batches} holds merged batches, which belong to no subset; "
                              "add them to a subset's source, or run without ingest.subsets")
        yield replace(item, name=f"{BATCHES_PREFIX}{item.name}")


def ingest(params: IngestParams, paths: Paths, ray: RayParams = RayParams()) -> IngestResult:
    signature, source_items = open_source(params, paths)
    rows, index = carried_over(paths.raw, signature)
    run = Ingestion(paths.raw, {name: sections.source for name, sections in params.sources().items()}, rows, index)
    for item in itertools.chain(source_items, merged_batches(paths, params)):
        run.take(item)
    chunks = [run.to_read[start:start + params.shard_size] for start in range(0, len(run.to_read), params.shard_size)]
    for chunk, results in zip(chunks, iter_tasks(read_items, chunks, ray, "ingest"), strict=True):
        run.store_shard(chunk, results)
    frame = save(run, signature)
    require_every_subset(frame, params)
    unconditional = int((frame["caption"] == "").sum())
    log.info(
        "ingest: %d new, %d unchanged, %d read, %d duplicates, %d rejected; the manifest holds %d samples "
        "from %s, %d of them unconditional (empty caption)",
        run.new, run.unchanged, run.read, len(run.duplicates), len(run.rejected), len(frame), params.source,
        unconditional,
    )
    return IngestResult(run.new, run.unchanged, run.read, tuple(run.duplicates), tuple(run.rejected),
                        len(frame), unconditional, paths.raw / MANIFEST)
