import hashlib

import pandas as pd

from pipeline.config import Paths
from pipeline.ingest import MANIFEST, MANIFEST_COLUMNS, ingest


def test_manifest_describes_every_file(tiny_params, tmp_path):
    paths = Paths(tmp_path)
    result = ingest(tiny_params.ingest, paths)
    manifest = pd.read_parquet(paths.raw / MANIFEST)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert result.ingested == len(manifest) == tiny_params.ingest.synthetic.count - result.duplicates
    for row in manifest.itertuples():
        data = (paths.raw / row.path).read_bytes()
        assert row.id == hashlib.sha256(data).hexdigest()
        assert row.bytes == len(data)
        assert (row.width, row.height, row.format, row.source) == (32, 32, "png", "synthetic")
    assert manifest["id"].is_unique


def test_ingest_is_reproducible(tiny_params, tmp_path):
    first, second = Paths(tmp_path / "a"), Paths(tmp_path / "b")
    ingest(tiny_params.ingest, first)
    ingest(tiny_params.ingest, second)
    pd.testing.assert_frame_equal(pd.read_parquet(first.raw / MANIFEST), pd.read_parquet(second.raw / MANIFEST))
