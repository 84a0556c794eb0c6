"""Stage `validate`: a Great Expectations suite over the raw manifest; bad rows are quarantined.

Every expectation carries the reason a person reads in reports/validation/quarantine.csv. The good
rows go on to data/validated/manifest.parquet; raw files are never touched. When more than
`validate.max_bad_fraction` of the rows are bad the stage fails, naming each failed expectation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from pipeline.atomic import atomic_dir, atomic_file, write_json
from pipeline.config import Paths, ValidateParams
from pipeline.ingest import MANIFEST, REJECTED

log = logging.getLogger(__name__)

ROW = "row"
DECODABLE = "decodable"
REJECTED_AT_INGEST = "rejected at ingest"
SUMMARY = "summary.json"
QUARANTINE = "quarantine.csv"


class ValidationFailed(RuntimeError):
    """Too many bad rows: the data set is not fit to train on."""


@dataclass(frozen=True)
class Check:
    expectation: object
    reason: str
    keep_first: bool = False  # a duplicate's first occurrence is kept; only the repeats are bad


@dataclass(frozen=True)
class ValidationResult:
    total: int
    quarantined: int
    failed_checks: dict[str, int]


def is_decodable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # any decoder error means the file cannot be trained on
        return False


def manifest_checks(params: ValidateParams) -> list[Check]:
    import great_expectations as gx

    expect = gx.expectations
    captions = [Check(expect.ExpectColumnValuesToNotBeNull(column="caption"), "caption missing")]
    if not params.allow_empty_captions:
        captions.append(
            Check(expect.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1), "caption empty")
        )
    return captions + [
        Check(expect.ExpectColumnValuesToBeInSet(column=DECODABLE, value_set=[True]), "image cannot be decoded"),
        Check(expect.ExpectColumnValuesToBeBetween(column="width", min_value=params.min_width),
              f"width below {params.min_width} px"),
        Check(expect.ExpectColumnValuesToBeBetween(column="height", min_value=params.min_height),
              f"height below {params.min_height} px"),
        Check(expect.ExpectColumnValuesToBeUnique(column="id"), "duplicate content", keep_first=True),
    ]


def run_suite(frame: pd.DataFrame, checks: list[Check]) -> list[tuple[Check, dict]]:
    """Run the checks as one Great Expectations suite; return each check with its result dict."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all rows")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="raw_manifest"))
    for check in checks:
        suite.add_expectation(check.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="raw_manifest", data=batch, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]},
    )
    return [(check, outcome.result) for check, outcome in zip(checks, result.results, strict=True)]


def _bad_rows(frame: pd.DataFrame, check: Check, result: dict) -> list[int]:
    rows = [int(entry[ROW]) for entry in result.get("unexpected_index_list") or []]
    if check.keep_first:
        repeats = frame.loc[rows].duplicated(subset="id", keep="first")
        rows = [row for row, repeat in zip(rows, repeats, strict=True) if repeat]
    return rows


def quarantine_reasons(frame: pd.DataFrame, outcomes: list[tuple[Check, dict]]) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    for check, result in outcomes:
        for row in _bad_rows(frame, check, result):
            reasons.setdefault(row, []).append(check.reason)
    return reasons


@dataclass(frozen=True)
class ManifestCheck:
    good: pd.DataFrame
    quarantined: pd.DataFrame  # id, path, caption, reason
    summary: dict
    failed_checks: dict[str, int]


def check_manifest(manifest: pd.DataFrame, root: Path, params: ValidateParams) -> ManifestCheck:
    """Run the suite over a manifest whose paths are relative to `root`; nothing is written."""
    frame = manifest.reset_index(drop=True)
    frame[ROW] = range(len(frame))
    frame[DECODABLE] = [is_decodable(root / relative) for relative in frame["path"]]
    outcomes = run_suite(frame, manifest_checks(params))
    reasons = quarantine_reasons(frame, outcomes)
    failed = {
        f"{check.expectation.expectation_type} ({check.reason})": int(result.get("unexpected_count") or 0)
        for check, result in outcomes
        if result.get("unexpected_count")
    }
    quarantined = frame.loc[sorted(reasons), ["id", "path", "caption"]].assign(
        reason=["; ".join(reasons[row]) for row in sorted(reasons)]
    )
    total = len(frame)
    bad_fraction = len(reasons) / total if total else 1.0
    summary = dict(
        total=total,
        quarantined=len(reasons),
        bad_fraction=bad_fraction,
        max_bad_fraction=params.max_bad_fraction,
        passed=bad_fraction <= params.max_bad_fraction,
        unexpected_rows={check.reason: int(result.get("unexpected_count") or 0) for check, result in outcomes},
    )
    good = manifest.reset_index(drop=True).drop(index=sorted(reasons)).reset_index(drop=True)
    return ManifestCheck(good, quarantined, summary, failed)


def failure_message(check: ManifestCheck, params: ValidateParams) -> str:
    summary = check.summary
    detail = ", ".join(f"{name}: {count} rows" for name, count in check.failed_checks.items())
    return (
        f"validation failed: {summary['quarantined']} of {summary['total']} rows are bad "
        f"({summary['bad_fraction']:.1%} > validate.max_bad_fraction {params.max_bad_fraction:.1%}); {detail}"
    )


def ingest_rejects(raw: Path) -> pd.DataFrame:
    """What ingest could not take (a path outside the data root, a missing file, not an image), with its
    reason, as quarantine rows."""
    if not (raw / REJECTED).is_file():
        return pd.DataFrame(columns=["id", "path", "caption", "reason"])
    rejected = pd.read_parquet(raw / REJECTED)
    return pd.DataFrame({"id": None, "path": rejected["origin"], "caption": None, "reason": rejected["reason"]})


def with_ingest_rejects(check: ManifestCheck, rejects: pd.DataFrame, params: ValidateParams) -> ManifestCheck:
    """Ingest's rejects are bad rows like any other: quarantined, counted and able to fail the stage."""
    if rejects.empty:
        return check
    quarantined = pd.concat([check.quarantined, rejects], ignore_index=True)
    total = check.summary["total"] + len(rejects)
    bad_fraction = len(quarantined) / total
    summary = check.summary | dict(
        total=total,
        quarantined=len(quarantined),
        bad_fraction=bad_fraction,
        passed=bad_fraction <= params.max_bad_fraction,
        unexpected_rows=check.summary["unexpected_rows"] | {REJECTED_AT_INGEST: len(rejects)},
    )
    return ManifestCheck(check.good, quarantined, summary, check.failed_checks | {REJECTED_AT_INGEST: len(rejects)})


def validate(params: ValidateParams, paths: Paths) -> ValidationResult:
    check = check_manifest(pd.read_parquet(paths.raw / MANIFEST), paths.raw, params)
    check = with_ingest_rejects(check, ingest_rejects(paths.raw), params)
    _write_reports(paths.validation_reports, check.summary, check.quarantined)
    if not check.summary["passed"]:
        raise ValidationFailed(f"{failure_message(check, params)}. See {paths.validation_reports / QUARANTINE}.")
    with atomic_dir(paths.validated) as staging:
        check.good.to_parquet(staging / MANIFEST, index=False)
    log.info("validate: %d rows kept, %d quarantined", len(check.good), len(check.quarantined))
    return ValidationResult(check.summary["total"], len(check.quarantined), check.failed_checks)


def _write_reports(directory: Path, summary: dict, quarantined: pd.DataFrame) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / SUMMARY, summary)
    with atomic_file(directory / QUARANTINE) as staging:
        quarantined.to_csv(staging, index=False)
