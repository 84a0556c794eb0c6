"""The Great Expectations suite over a manifest, and its verdict: which rows are bad and why, and
whether the data set as a whole passes. The validate stage runs it over data/raw; monitoring runs it
over each incoming batch.

Hard checks judge the data set as a whole (its columns, its size, its share of uncaptioned rows per
source, its share of bad rows, and, for a run with named subsets (`ingest.subsets`), each subset's share of bad
rows and that quarantine leaves it a row). Soft checks judge each row; a failing row is quarantined with a reason a
person can act on. Image properties Great Expectations cannot compute (decodable, colour mode,
perceptual hash, brightness) come from `pipeline.quality.image_checks`, read once per row, headers before pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pandas as pd

from pipeline.contracts.records import DATA_DOCS
from pipeline.core.config import ValidateParams
from pipeline.core.source_params import IMPLICIT_SUBSET
from pipeline.data.images import ImageSource
from pipeline.quality.image_checks import property_columns
from pipeline.quality.near_duplicates import near_duplicate_of

ROW = "row"
DECODABLE = "decodable"
SUITE = "raw_manifest"
REQUIRED_COLUMNS = ("id", "caption", "width", "height")
BAD_ROWS = "bad rows (validate.max_bad_fraction)"
DEFAULT_SOURCE = "default"  # manifests without a `source` column (monitoring batches)


@dataclass(frozen=True)
class Check:
    expectation: object
    reason: str
    keep_first: bool = False  # a duplicate's first occurrence is kept; only the repeats are bad
    hard: bool = False  # fails the stage instead of quarantining rows
    detail: str | None = None  # a column whose value makes the row's reason specific


class Images(Protocol):
    """Where a manifest's images are: it measures them all and hands out single ones again."""

    def measure(self, frame: pd.DataFrame, params: ValidateParams) -> dict[str, list]:
        """`pipeline.quality.image_checks.property_columns` of every row's image, in row order."""

    def source(self, frame: pd.DataFrame, row: int) -> ImageSource:
        """One row's image again (near-duplicate candidates are compared in colour)."""


@dataclass(frozen=True)
class ImageFiles:
    """Images as files, the manifest's `path` column relative to `root` (monitoring's incoming batches)."""

    root: Path

    def measure(self, frame: pd.DataFrame, params: ValidateParams) -> dict[str, list]:
        return property_columns([self.source(frame, row) for row in range(len(frame))], params.max_pixels,
                                params.near_duplicate_min_side)

    def source(self, frame: pd.DataFrame, row: int) -> Path:
        return self.root / frame["path"].iat[row]


def row_properties(manifest: pd.DataFrame, images: Images, params: ValidateParams) -> pd.DataFrame:
    """The manifest with the per-row columns the suite checks; every image is read once, header first."""
    frame = manifest.reset_index(drop=True)
    frame[ROW] = range(len(frame))
    if "source" not in frame:
        frame["source"] = DEFAULT_SOURCE
    captions = frame["caption"].fillna("").astype(str)
    frame["uncaptioned"] = captions.eq("")
    frame["caption_length"] = captions.str.len().where(~frame["uncaptioned"])
    frame["aspect_ratio"] = (frame["width"] / frame["height"].where(frame["height"] > 0)).astype(float)
    properties = images.measure(frame, params)
    hashes = properties.pop("dhash")  # 64-bit unsigned: a pandas column would turn them into floats
    for name, values in properties.items():
        frame[name] = values
    if "origin" not in frame:  # a batch's manifest: its files are the names a person knows
        frame["origin"] = frame.get("path", frame["id"])
    frame["near_duplicate_of"] = (
        near_duplicate_of(hashes, lambda row: images.source(frame, row), frame["origin"].tolist(),
                          params.max_near_duplicate_distance, params.max_near_duplicate_colour_difference,
                          params.max_pixels)
        if params.max_near_duplicate_distance >= 0 else None
    )
    return frame


def caption_share_checks(sources: list[str], params: ValidateParams) -> list[Check]:
    """One hard check per source: its share of uncaptioned rows within max_empty_caption_share."""
    import great_expectations as gx

    checks = []
    for source in sources:
        share = params.empty_caption_share(source)
        expectation = gx.expectations.ExpectColumnValuesToBeInSet(
            column="uncaptioned", value_set=[False], mostly=1 - share,
            row_condition=f"source=={json.dumps(source)}", condition_parser="pandas")
        checks.append(Check(expectation, f"uncaptioned rows of source {source} above "
                                         f"validate.max_empty_caption_share {share:.0%}", hard=True))
    return checks


def table_checks(params: ValidateParams) -> list[Check]:
    """Hard checks of the table as a whole; the only ones that can run on a manifest missing columns."""
    import great_expectations as gx

    expect = gx.expectations
    return [
        Check(expect.ExpectTableColumnsToMatchSet(column_set=list(REQUIRED_COLUMNS), exact_match=False),
              f"manifest lacks a required column ({', '.join(REQUIRED_COLUMNS)})", hard=True),
        Check(expect.ExpectTableRowCountToBeBetween(min_value=params.min_rows),
              f"fewer rows than validate.min_rows {params.min_rows}", hard=True),
    ]


def manifest_checks(params: ValidateParams, sources: list[str] = ()) -> list[Check]:
    """The whole suite: table checks, the uncaptioned share of each source, then the soft row checks."""
    import great_expectations as gx

    expect = gx.expectations
    between = expect.ExpectColumnValuesToBeBetween
    soft = [
        Check(between(column="caption_length", min_value=params.min_caption_length,
                      max_value=params.max_caption_length),
              f"caption length outside validate.min/max_caption_length {params.min_caption_length}-"
              f"{params.max_caption_length} characters", detail="caption_length"),
        Check(expect.ExpectColumnValuesToBeInSet(column=DECODABLE, value_set=[True]), "image cannot be decoded",
              detail="problem"),
        Check(between(column="pixels", max_value=params.max_pixels),
              f"header declares more pixels than validate.max_pixels {params.max_pixels}; not decoded",
              detail="pixels"),
        Check(between(column="width", min_value=params.min_width, max_value=params.max_width),
              f"width outside validate.min/max_width {params.min_width}-{params.max_width} px", detail="width"),
        Check(between(column="height", min_value=params.min_height, max_value=params.max_height),
              f"height outside validate.min/max_height {params.min_height}-{params.max_height} px",
              detail="height"),
        Check(between(column="aspect_ratio", min_value=params.min_aspect_ratio, max_value=params.max_aspect_ratio),
              f"aspect ratio outside validate.min/max_aspect_ratio {params.min_aspect_ratio}-"
              f"{params.max_aspect_ratio}", detail="aspect_ratio"),
        Check(expect.ExpectColumnValuesToBeInSet(column="image_format", value_set=list(params.allowed_formats)),
              "format not in validate.allowed_formats", detail="image_format"),
        Check(expect.ExpectColumnValuesToBeInSet(column="mode", value_set=list(params.allowed_modes)),
              "colour mode not in validate.allowed_modes", detail="mode"),
        Check(expect.ExpectColumnValuesToBeUnique(column="id"), "duplicate content", keep_first=True),
        Check(expect.ExpectColumnValuesToBeNull(column="near_duplicate_of"),
              f"near-duplicate of an earlier image (dHash within validate.max_near_duplicate_distance "
              f"{params.max_near_duplicate_distance} bits, colours within "
              f"validate.max_near_duplicate_colour_difference {params.max_near_duplicate_colour_difference:g})",
              detail="near_duplicate_of"),
        Check(between(column="contrast", min_value=params.min_contrast),
              f"blank or near-uniform image (colour spread below validate.min_contrast {params.min_contrast})",
              detail="contrast"),
        Check(between(column="brightness", min_value=params.min_brightness, max_value=params.max_brightness),
              f"extreme brightness (mean grey level outside validate.min/max_brightness "
              f"{params.min_brightness}-{params.max_brightness})", detail="brightness"),
    ]
    return table_checks(params) + caption_share_checks(list(sources), params) + soft


def run_suite(frame: pd.DataFrame, checks: list[Check], docs: Path | None = None) -> list[tuple[Check, dict]]:
    """Run the checks as one Great Expectations suite; return each check with its result dict (plus its
    verdict, `success`: a hard check with `mostly` passes with a few unexpected rows).

    With `docs`, the run also builds the Great Expectations Data Docs site (HTML) in that folder.
    """
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("rows")
        .add_batch_definition_whole_dataframe("all rows")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE))
    for check in checks:
        suite.add_expectation(check.expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=SUITE, data=batch, suite=suite))
    actions = []
    if docs is not None:
        context.add_data_docs_site(site_name=DATA_DOCS, site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data docs", site_names=[DATA_DOCS]))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=SUITE, validation_definitions=[definition], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]},
    ))
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = result.run_results.values()
    return [(check, outcome.result | {"success": outcome.success})
            for check, outcome in zip(checks, validation.results, strict=True)]


def _bad_rows(frame: pd.DataFrame, check: Check, result: dict) -> list[int]:
    rows = [int(entry[ROW]) for entry in result.get("unexpected_index_list") or []]
    if check.keep_first:
        repeats = frame.loc[rows].duplicated(subset="id", keep="first")
        rows = [row for row, repeat in zip(rows, repeats, strict=True) if repeat]
    return rows


def _reason(frame: pd.DataFrame, check: Check, row: int) -> str:
    if check.detail is None:
        return check.reason
    value = frame.loc[row, check.detail]
    shown = f"{value:.6g}" if isinstance(value, float) else str(value)  # 5000.0 -> 5000
    return f"{check.reason}: {shown}"


def quarantine_reasons(frame: pd.DataFrame, outcomes: list[tuple[Check, dict]]) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    for check, result in outcomes:
        if check.hard:
            continue
        for row in _bad_rows(frame, check, result):
            reasons.setdefault(row, []).append(_reason(frame, check, row))
    return reasons


def hard_check_results(outcomes: list[tuple[Check, dict]]) -> dict[str, dict]:
    """Every hard check, named by its expectation and reason: passed or not, and what was observed."""
    results = {}
    for check, result in outcomes:
        if check.hard:
            observed = result.get("observed_value", "")
            if "unexpected_count" in result:
                observed = f"{result['unexpected_count']} of {result['element_count']} rows"
            elif isinstance(observed, dict | list):
                observed = json.dumps(observed, default=str)
            name = f"{check.expectation.expectation_type} ({check.reason})"
            results[name] = dict(passed=bool(result["success"]), observed=str(observed))
    return results


def failed_hard_checks(summary: dict) -> dict[str, str]:
    return {name: result["observed"] for name, result in summary["hard_checks"].items() if not result["passed"]}


@dataclass(frozen=True)
class ManifestCheck:
    good: pd.DataFrame
    quarantined: pd.DataFrame  # id, origin (the name in the source), caption, reason
    summary: dict
    failed_checks: dict[str, int]


def check_manifest(
    manifest: pd.DataFrame, images: Images, params: ValidateParams, docs: Path | None = None
) -> ManifestCheck:
    """Run the suite over a manifest whose images `images` reads; only `docs`, when given, is written."""
    missing = [column for column in REQUIRED_COLUMNS if column not in manifest]
    if missing:  # nothing per row can be measured: only the table-level checks run, and fail
        frame = manifest.reset_index(drop=True).assign(**{ROW: range(len(manifest))})
        checks = table_checks(params)
    else:
        frame = row_properties(manifest, images, params)
        checks = manifest_checks(params, sorted(frame["source"].astype(str).unique()))
    outcomes = run_suite(frame, checks, docs)
    reasons = quarantine_reasons(frame, outcomes)
    failed = {
        f"{check.expectation.expectation_type} ({check.reason})": int(result.get("unexpected_count") or 0)
        for check, result in outcomes
        if result.get("unexpected_count") and not check.hard
    }
    rows = sorted(reasons)
    quarantined = frame.loc[rows].reindex(columns=["id", "origin", "caption"]).assign(
        reason=["; ".join(reasons[row]) for row in rows])
    summary = dict(
        total=len(frame),
        quarantined=len(rows),
        max_bad_fraction=params.max_bad_fraction,
        hard_checks=hard_check_results(outcomes),
        unexpected_rows={check.reason: int(result.get("unexpected_count") or 0)
                         for check, result in outcomes if not check.hard},
        **subset_counts(frame, rows),
    )
    good = manifest.reset_index(drop=True).drop(index=rows).reset_index(drop=True)
    return ManifestCheck(good, quarantined, with_verdict(summary, params), failed)


def subset_counts(frame: pd.DataFrame, bad_rows: list[int]) -> dict:
    """`{"subsets": {name: {"total", "quarantined"}}}` for a manifest of named subsets; {} for any other (a run
    with one source, a monitoring batch), whose summary keeps its old keys."""
    if "subset" not in frame or set(frame["subset"]) <= {IMPLICIT_SUBSET}:
        return {}
    bad = frame["subset"].loc[bad_rows].value_counts()
    return {"subsets": {str(name): dict(total=int(total), quarantined=int(bad.get(name, 0)))
                        for name, total in frame["subset"].value_counts(sort=False).items()}}


def subset_checks(summary: dict, params: ValidateParams) -> dict[str, dict]:
    """Per named subset: quarantine must leave it a row, and its bad rows stay within validate.max_bad_fraction:
    12 bad subject photos among 1,000 class images are 1 % of the data set but all of the subject."""
    checks = {}
    for name, counts in summary.get("subsets", {}).items():
        total, bad = counts["total"], counts["quarantined"]
        observed = f"{bad} of {total} rows"
        checks[f"subset {name} emptied by quarantine (ingest.subsets.{name})"] = dict(passed=bad < total,
                                                                                      observed=observed)
        checks[f"bad rows of subset {name} (validate.max_bad_fraction)"] = dict(
            passed=bad <= params.max_bad_fraction * total, observed=observed)
    return checks


def with_verdict(summary: dict, params: ValidateParams) -> dict:
    """The bad-row fraction is itself a hard check; the data set passes when no hard check failed."""
    total = summary["total"]
    bad_fraction = summary["quarantined"] / total if total else 1.0
    bad_rows = {BAD_ROWS: dict(passed=bad_fraction <= params.max_bad_fraction,
                               observed=f"{summary['quarantined']} of {total} rows")}
    hard_checks = summary["hard_checks"] | bad_rows | subset_checks(summary, params)
    return summary | dict(bad_fraction=bad_fraction, hard_checks=hard_checks,
                          passed=all(result["passed"] for result in hard_checks.values()))


def failure_message(check: ManifestCheck, params: ValidateParams) -> str:
    summary = check.summary
    hard = "; ".join(f"{name}: observed {observed}" for name, observed in failed_hard_checks(summary).items()
                     if name != BAD_ROWS)
    detail = ", ".join(f"{name}: {count} rows" for name, count in check.failed_checks.items())
    return (
        f"validation failed: {hard + '; ' if hard else ''}{summary['quarantined']} of {summary['total']} rows "
        f"are bad ({summary['bad_fraction']:.1%}, validate.max_bad_fraction {params.max_bad_fraction:.1%}); {detail}"
    )
