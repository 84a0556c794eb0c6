import hashlib
import shutil

import pandas as pd
import pytest

from pipeline.config import Paths, ValidateParams
from pipeline.ingest import MANIFEST, ingest
from pipeline.validate import QUARANTINE, SUMMARY, ValidationFailed, validate


def _tree_hash(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def dirty_raw(tiny_params, tmp_path):
    """A real ingest, then four rows spoiled in the ways real folders are."""
    paths = Paths(tmp_path)
    ingest(tiny_params.ingest, paths)
    manifest = pd.read_parquet(paths.raw / MANIFEST)
    (paths.raw / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    manifest.loc[0, "path"] = "images/broken.png"
    manifest.loc[1, "caption"] = ""
    manifest.loc[2, "caption"] = None
    manifest.loc[3, ["width", "height"]] = (4, 4)
    duplicate = manifest.iloc[[5]].assign(path="images/copy.png")
    shutil.copy(paths.raw / manifest.loc[5, "path"], paths.raw / "images" / "copy.png")
    manifest = pd.concat([manifest, duplicate], ignore_index=True)
    manifest.to_parquet(paths.raw / MANIFEST, index=False)
    return paths, manifest


def test_bad_rows_are_quarantined_with_reasons(dirty_raw):
    paths, manifest = dirty_raw
    before = _tree_hash(paths.raw)
    result = validate(ValidateParams(max_bad_fraction=0.2), paths)
    assert _tree_hash(paths.raw) == before, "validation must never touch raw data"

    quarantine = pd.read_csv(paths.validation_reports / QUARANTINE).set_index("path")
    assert quarantine.loc["images/broken.png", "reason"] == "image cannot be decoded"
    assert quarantine.loc[manifest.loc[1, "path"], "reason"] == "caption empty"
    assert "caption missing" in quarantine.loc[manifest.loc[2, "path"], "reason"]
    assert "width below 16 px" in quarantine.loc[manifest.loc[3, "path"], "reason"]
    assert quarantine.loc["images/copy.png", "reason"] == "duplicate content"
    assert manifest.loc[5, "path"] not in quarantine.index, "the first copy of a duplicate is kept"
    assert result.quarantined == len(quarantine) == 5

    kept = pd.read_parquet(paths.validated / MANIFEST)
    assert len(kept) == len(manifest) - 5
    assert kept["id"].is_unique and kept["caption"].str.len().min() > 0


def test_too_many_bad_rows_fail_with_the_expectations_named(dirty_raw):
    paths, _ = dirty_raw
    with pytest.raises(ValidationFailed, match=r"5 of \d+ rows are bad.*expect_column_values_to_be_unique \(duplicate content\): 2 rows"):
        validate(ValidateParams(max_bad_fraction=0.01), paths)
    assert (paths.validation_reports / SUMMARY).is_file(), "the report is written even when the stage fails"
    assert not paths.validated.exists()


@pytest.fixture
def partly_labelled_raw(tmp_path):
    """A manifest source with a captioned image, an uncaptioned one, a row outside the root and a missing file."""
    from pipeline.config import parse_params

    from .conftest import write_image

    write_image(tmp_path / "data" / "a.png", 1)
    write_image(tmp_path / "data" / "b.png", 2)
    (tmp_path / "data" / "list.csv").write_text("path,text\na.png,a cat\nb.png,\n../../etc/passwd,x\ngone.png,y\n")
    params = parse_params({"ingest": {"source": "manifest", "manifest": {"path": str(tmp_path / "data" / "list.csv")}}})
    paths = Paths(tmp_path / "project")
    ingest(params.ingest, paths)
    return paths


def test_ingest_rejects_are_quarantined_and_empty_captions_kept_when_allowed(partly_labelled_raw):
    paths = partly_labelled_raw
    result = validate(ValidateParams(max_bad_fraction=0.5, allow_empty_captions=True), paths)

    assert (result.total, result.quarantined) == (4, 2)
    quarantine = pd.read_csv(paths.validation_reports / QUARANTINE).set_index("path")
    assert quarantine.loc["../../etc/passwd", "reason"].startswith("list.csv row 3: path '../../etc/passwd' leads outside")
    assert quarantine.loc["gone.png", "reason"].startswith("list.csv row 4: file not found")
    kept = pd.read_parquet(paths.validated / MANIFEST)
    assert sorted(kept["caption"]) == ["", "a cat"], "the uncaptioned image trains the unconditional branch"


def test_empty_captions_are_quarantined_by_default(partly_labelled_raw):
    result = validate(ValidateParams(max_bad_fraction=1.0), partly_labelled_raw)
    assert result.quarantined == 3
    quarantine = pd.read_csv(partly_labelled_raw.validation_reports / QUARANTINE)
    assert "caption empty" in set(quarantine["reason"])
