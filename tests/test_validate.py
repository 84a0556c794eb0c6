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
