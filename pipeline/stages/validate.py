"""Stage `validate`: the Great Expectations suite (`pipeline.quality.manifest_checks`) over the raw manifest;
bad rows are quarantined.

Hard checks judge the data set as a whole (its columns, its size, its share of uncaptioned rows per
source, its share of bad rows): when one fails the stage fails, naming the expectation and its counts.
Soft checks judge each row; a failing row is quarantined with a reason a person can act on
(reports/validation/quarantine.csv). Image properties Great Expectations cannot compute (decodable,
colour mode, perceptual hash, brightness) come from `pipeline.quality.image_checks`, read once per row, headers
before pixels, on Ray (`pipeline.runtime.ray_tasks`), one task per data/raw shard. The good rows go on to
data/validated/manifest.parquet; raw data is never touched.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.contracts.data import MANIFEST, REJECTED
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import DATA_DOCS, QUARANTINE, SUMMARY
from pipeline.contracts.shards import shard_images
from pipeline.core.atomic import atomic_dir, atomic_file, write_json
from pipeline.core.config import RayParams, ValidateParams
from pipeline.core.errors import UserError
from pipeline.quality.image_checks import property_columns
from pipeline.quality.manifest_checks import ManifestCheck, check_manifest, failure_message, with_verdict
from pipeline.runtime.ray_tasks import run_tasks

log = logging.getLogger(__name__)

REJECTED_AT_INGEST = "rejected at ingest"
SHARDS_KEPT = 8  # shards whose images near-duplicate confirmation keeps at hand


class ValidationFailed(UserError, RuntimeError):
    """Too many bad rows: the data set is not fit to train on."""


@dataclass(frozen=True)
class ValidationResult:
    total: int
    quarantined: int
    failed_checks: dict[str, int]


@dataclass(frozen=True)
class ShardMeasurement:
    """A Ray task: measure these images of one shard, in this order."""

    shard: Path
    ids: tuple[str, ...]
    max_pixels: int
    hash_min_side: int


def measure_shard(task: ShardMeasurement) -> list[dict]:
    images = shard_images(task.shard)
    sources = [images.get(sample_id) for sample_id in task.ids]
    columns = property_columns(sources, task.max_pixels, task.hash_min_side)
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


@dataclass(frozen=True)
class ShardedImages:
    """data/raw's images, in the shards its manifest names; measured on Ray, shard by shard."""

    root: Path
    ray: RayParams

    def measure(self, frame: pd.DataFrame, params: ValidateParams) -> dict[str, list]:
        shards = frame.groupby("shard", sort=False).indices
        tasks = [ShardMeasurement(self.root / shard, tuple(frame["id"].iloc[rows]), params.max_pixels,
                                  params.near_duplicate_min_side) for shard, rows in shards.items()]
        measured: list[dict | None] = [None] * len(frame)
        for rows, results in zip(shards.values(), run_tasks(measure_shard, tasks, self.ray, "validate"), strict=True):
            for row, result in zip(rows, results, strict=True):
                measured[row] = result
        return {name: [row[name] for row in measured] for name in measured[0]} if measured else {}

    def source(self, frame: pd.DataFrame, row: int) -> bytes | None:
        return self.shard_images(frame["shard"].iat[row]).get(frame["id"].iat[row])

    @functools.lru_cache(maxsize=SHARDS_KEPT)
    def shard_images(self, shard: str) -> pd.Series:
        return shard_images(self.root / shard)


def ingest_rejects(raw: Path) -> pd.DataFrame:
    """What ingest could not take (a path outside the data root, a missing file, not an image), with its
    reason, as quarantine rows."""
    if not (raw / REJECTED).is_file():
        return pd.DataFrame(columns=["id", "origin", "caption", "reason"])
    rejected = pd.read_parquet(raw / REJECTED)
    return pd.DataFrame({"id": None, "origin": rejected["origin"], "caption": None, "reason": rejected["reason"]})


def with_ingest_rejects(check: ManifestCheck, rejects: pd.DataFrame, params: ValidateParams) -> ManifestCheck:
    """Ingest's rejects are bad rows like any other: quarantined, counted and able to fail the stage."""
    if rejects.empty:
        return check
    quarantined = pd.concat([check.quarantined, rejects], ignore_index=True)
    summary = check.summary | dict(
        total=check.summary["total"] + len(rejects),
        quarantined=len(quarantined),
        unexpected_rows=check.summary["unexpected_rows"] | {REJECTED_AT_INGEST: len(rejects)},
    )
    if "subsets" in summary:
        summary["subsets"] = with_subset_rejects(summary["subsets"], rejects["origin"])
    return ManifestCheck(check.good, quarantined, with_verdict(summary, params),
                         check.failed_checks | {REJECTED_AT_INGEST: len(rejects)})


def with_subset_rejects(subsets: dict[str, dict], origins: pd.Series) -> dict[str, dict]:
    """Each subset's counts with ingest's rejects of its items (named `<subset>/...`) added as bad rows."""
    rejected = origins.str.split("/", n=1).str[0].value_counts()
    return {name: dict(total=counts["total"] + int(rejected.get(name, 0)),
                       quarantined=counts["quarantined"] + int(rejected.get(name, 0)))
            for name, counts in subsets.items()}


def validate(params: ValidateParams, paths: Paths, ray: RayParams = RayParams()) -> ValidationResult:
    reports = paths.validation_reports
    with atomic_dir(reports / DATA_DOCS) as docs:
        check = check_manifest(pd.read_parquet(paths.raw / MANIFEST), ShardedImages(paths.raw, ray), params, docs)
    check = with_ingest_rejects(check, ingest_rejects(paths.raw), params)
    _write_reports(reports, check.summary, check.quarantined)
    if not check.summary["passed"]:
        raise ValidationFailed(f"{failure_message(check, params)}. See {reports / QUARANTINE} and "
                               f"{reports / DATA_DOCS / 'index.html'}.")
    with atomic_dir(paths.validated) as staging:
        check.good.to_parquet(staging / MANIFEST, index=False)
    log.info("validate: %d rows kept, %d quarantined", len(check.good), len(check.quarantined))
    return ValidationResult(check.summary["total"], len(check.quarantined), check.failed_checks)


def _write_reports(directory: Path, summary: dict, quarantined: pd.DataFrame) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / SUMMARY, summary)
    with atomic_file(directory / QUARANTINE) as staging:
        quarantined[["origin", "reason", "id", "caption"]].to_csv(staging, index=False)
