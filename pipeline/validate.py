"""Stage `validate`: the Great Expectations suite (`pipeline.manifest_checks`) over the raw manifest;
bad rows are quarantined.

Hard checks judge the data set as a whole (its columns, its size, its share of uncaptioned rows per
source, its share of bad rows): when one fails the stage fails, naming the expectation and its counts.
Soft checks judge each row; a failing row is quarantined with a reason a person can act on
(reports/validation/quarantine.csv). Image properties Great Expectations cannot compute (decodable,
colour mode, perceptual hash, brightness) come from `pipeline.image_checks`, read once per row, headers
before pixels. The good rows go on to data/validated/manifest.parquet; raw files are never touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_dir, atomic_file, write_json
from pipeline.config import ValidateParams
from pipeline.contracts.data import MANIFEST, REJECTED
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import DATA_DOCS, QUARANTINE, SUMMARY
from pipeline.manifest_checks import ManifestCheck, check_manifest, failure_message, with_verdict

log = logging.getLogger(__name__)

REJECTED_AT_INGEST = "rejected at ingest"


class ValidationFailed(RuntimeError):
    """Too many bad rows: the data set is not fit to train on."""


@dataclass(frozen=True)
class ValidationResult:
    total: int
    quarantined: int
    failed_checks: dict[str, int]


def ingest_rejects(raw: Path) -> pd.DataFrame:
    """What ingest could not take (a path outside the data root, a missing file, not an image), with its
    reason, as quarantine rows."""
    if not (raw / REJECTED).is_file():
        return pd.DataFrame(columns=["id", "path", "origin", "caption", "reason"])
    rejected = pd.read_parquet(raw / REJECTED)
    return pd.DataFrame({"id": None, "path": rejected["origin"], "origin": rejected["origin"], "caption": None,
                         "reason": rejected["reason"]})


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
    return ManifestCheck(check.good, quarantined, with_verdict(summary, params),
                         check.failed_checks | {REJECTED_AT_INGEST: len(rejects)})


def validate(params: ValidateParams, paths: Paths) -> ValidationResult:
    reports = paths.validation_reports
    with atomic_dir(reports / DATA_DOCS) as docs:
        check = check_manifest(pd.read_parquet(paths.raw / MANIFEST), paths.raw, params, docs)
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
        quarantined[["path", "origin", "reason", "id", "caption"]].to_csv(staging, index=False)
