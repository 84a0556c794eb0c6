import json

import pandas as pd
import pytest

from pipeline.contracts.data import MANIFEST
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import DATA_DOCS, QUARANTINE, SUMMARY
from pipeline.contracts.shards import write_shard
from pipeline.core.config import RayParams, ValidateParams
from pipeline.core.params_file import parse_params
from pipeline.quality.manifest_checks import ImageFiles, check_manifest, failed_hard_checks
from pipeline.stages.ingest import ingest
from pipeline.stages.validate import ShardedImages, ValidationFailed, validate

from .conftest import tree_hashes, write_pattern

SOME_UNCAPTIONED = {"default": 0.05}


@pytest.fixture
def dirty_raw(tiny_params, tmp_path):
    """A real ingest, then four rows spoiled in the ways real folders are."""
    paths = Paths(tmp_path)
    ingest(tiny_params.ingest, paths)
    manifest = pd.read_parquet(paths.raw / MANIFEST)
    write_shard(paths.raw / "shards" / "broken.parquet", ["broken"], [b"\x89PNG\r\n\x1a\n not really"])
    manifest.loc[0, ["id", "shard", "origin"]] = ("broken", "shards/broken.parquet", "broken.png")
    manifest.loc[1, "caption"] = ""
    manifest.loc[2, "caption"] = None
    manifest.loc[3, ["width", "height"]] = (4, 4)
    duplicate = manifest.iloc[[5]].assign(origin="copy.png")
    manifest = pd.concat([manifest, duplicate], ignore_index=True)
    manifest.to_parquet(paths.raw / MANIFEST, index=False)
    return paths, manifest


def test_bad_rows_are_quarantined_with_reasons(dirty_raw):
    paths, manifest = dirty_raw
    before = tree_hashes(paths.raw)
    result = validate(ValidateParams(max_bad_fraction=0.2, max_empty_caption_share=SOME_UNCAPTIONED), paths)
    assert tree_hashes(paths.raw) == before, "validation must never touch raw data"

    quarantine = pd.read_csv(paths.validation_reports / QUARANTINE).set_index("origin")
    assert quarantine.loc["broken.png", "reason"].startswith("image cannot be decoded: ")
    assert "width outside validate.min/max_width 16-8192 px: 4" in quarantine.loc[manifest.loc[3, "origin"], "reason"]
    assert quarantine.loc["copy.png", "reason"] == "duplicate content"
    assert manifest.loc[5, "origin"] not in quarantine.index, "the first copy of a duplicate is kept"
    assert result.quarantined == len(quarantine) == 3

    kept = pd.read_parquet(paths.validated / MANIFEST)
    assert len(kept) == len(manifest) - 3
    assert kept["id"].is_unique
    assert kept["caption"].fillna("").eq("").sum() == 2, "uncaptioned rows within the allowance are kept"


def test_too_many_bad_rows_fail_with_the_expectations_named(dirty_raw):
    paths, _ = dirty_raw
    with pytest.raises(ValidationFailed, match=r"3 of \d+ rows are bad.*expect_column_values_to_be_unique \(duplicate content\): 2 rows"):
        validate(ValidateParams(max_bad_fraction=0.01, max_empty_caption_share=SOME_UNCAPTIONED), paths)
    assert (paths.validation_reports / SUMMARY).is_file(), "the report is written even when the stage fails"
    assert not paths.validated.exists()


def test_more_uncaptioned_rows_than_the_source_allows_fail_the_stage(dirty_raw):
    paths, _ = dirty_raw
    with pytest.raises(ValidationFailed, match=r"expect_column_values_to_be_in_set \(uncaptioned rows of source "
                                               r"synthetic above validate.max_empty_caption_share 0%\): observed 2 of 161 rows"):
        validate(ValidateParams(max_bad_fraction=0.2), paths)
    summary = json.loads((paths.validation_reports / SUMMARY).read_text())
    assert not summary["passed"] and list(failed_hard_checks(summary)) == [
        "expect_column_values_to_be_in_set (uncaptioned rows of source synthetic above validate.max_empty_caption_share 0%)"]
    assert summary["hard_checks"]["expect_table_row_count_to_be_between (fewer rows than validate.min_rows 10)"] == {
        "passed": True, "observed": "161"}


def test_too_few_rows_and_missing_columns_are_hard_failures(tmp_path):
    few = pd.DataFrame({"id": ["a"], "path": ["a.png"], "caption": ["a cat"]})  # no width, no height
    check = check_manifest(few, ImageFiles(tmp_path), ValidateParams(min_rows=2))
    assert not check.summary["passed"]
    assert set(failed_hard_checks(check.summary)) == {
        "expect_table_columns_to_match_set (manifest lacks a required column (id, caption, width, height))",
        "expect_table_row_count_to_be_between (fewer rows than validate.min_rows 2)",
    }


def test_the_data_docs_site_shows_the_suite(dirty_raw):
    paths, _ = dirty_raw
    validate(ValidateParams(max_bad_fraction=0.2, max_empty_caption_share=SOME_UNCAPTIONED), paths)
    index = (paths.validation_reports / DATA_DOCS / "index.html").read_text(encoding="utf-8")
    assert "raw_manifest" in index
    suite_page = (paths.validation_reports / DATA_DOCS / "expectations" / "raw_manifest.html").read_text(encoding="utf-8")
    for rendered in ("values must be unique", "values must be null", "near_duplicate_of", "caption_length"):
        assert rendered in suite_page
    assert list((paths.validation_reports / DATA_DOCS / "validations" / "raw_manifest").rglob("*.html")), \
        "the run's validation result has its own page"


def test_empty_caption_shares_are_per_source_and_checked():
    params = parse_params({"validate": {"max_empty_caption_share": {"folder": 0.3}}}).validate_
    assert (params.empty_caption_share("folder"), params.empty_caption_share("synthetic")) == (0.3, 0.0)
    with pytest.raises(ValueError, match=r"validate.max_empty_caption_share: .*unknown source \['fodler'\]"):
        parse_params({"validate": {"max_empty_caption_share": {"fodler": 0.3}}})


@pytest.fixture
def partly_labelled_raw(tmp_path):
    """A manifest source with a captioned image, an uncaptioned one, a row outside the root and a missing file."""
    write_pattern(tmp_path / "data" / "a.png", 1)
    write_pattern(tmp_path / "data" / "b.png", 2)
    (tmp_path / "data" / "list.csv").write_text("path,text\na.png,a cat\nb.png,\n../../etc/passwd,x\ngone.png,y\n")
    params = parse_params({"ingest": {"source": "manifest", "manifest": {"path": str(tmp_path / "data" / "list.csv")}}})
    paths = Paths(tmp_path / "project")
    ingest(params.ingest, paths)
    return paths


def test_ingest_rejects_are_quarantined_and_empty_captions_kept_when_allowed(partly_labelled_raw):
    paths = partly_labelled_raw
    result = validate(ValidateParams(min_rows=1, max_bad_fraction=0.5, max_empty_caption_share={"manifest": 0.5}), paths)

    assert (result.total, result.quarantined) == (4, 2)
    quarantine = pd.read_csv(paths.validation_reports / QUARANTINE).set_index("origin")
    assert quarantine.loc["../../etc/passwd", "reason"].startswith("list.csv row 3: path '../../etc/passwd' leads outside")
    assert quarantine.loc["gone.png", "reason"].startswith("list.csv row 4: file not found")
    kept = pd.read_parquet(paths.validated / MANIFEST)
    assert sorted(kept["caption"]) == ["", "a cat"], "the uncaptioned image trains the unconditional branch"


def test_a_manifest_without_optional_columns_is_checked(partly_labelled_raw):
    """Monitoring batches have no origin, format or source column."""
    manifest = pd.read_parquet(partly_labelled_raw.raw / MANIFEST).drop(columns=["origin", "format", "bytes", "source"])
    check = check_manifest(manifest, ShardedImages(partly_labelled_raw.raw, RayParams()), ValidateParams(min_rows=1))
    assert len(check.good) == 2 and failed_hard_checks(check.summary) == {
        "expect_column_values_to_be_in_set (uncaptioned rows of source default above "
        "validate.max_empty_caption_share 0%)": "1 of 2 rows"}


def test_the_old_empty_caption_switch_names_its_replacement():
    with pytest.raises(ValueError, match=r"validate.allow_empty_captions: replaced by validate.max_empty_caption_share"):
        parse_params({"validate": {"allow_empty_captions": True}})
