import hashlib

import pandas as pd

from pipeline.contracts.data import MANIFEST, RAW_MANIFEST_COLUMNS, REJECTED
from pipeline.contracts.paths import Paths
from pipeline.contracts.shards import SHARDS_DIR, image_bytes, read_shard
from pipeline.core.atomic import read_json
from pipeline.core.params_file import parse_params
from pipeline.stages.ingest import INDEX, ingest

from .conftest import tree_hashes, write_image


def folder_params(folder):
    return parse_params({"ingest": {"source": "folder", "folder": {"path": str(folder)}}}).ingest


def manifest_of(paths):
    return pd.read_parquet(paths.raw / MANIFEST).set_index("origin")


def shards_of(paths):
    """Each shard's file name and sha256 of its bytes."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (paths.raw / SHARDS_DIR).iterdir()}


def stored_images(paths):
    return sum(len(read_shard(path, ["id"])) for path in (paths.raw / SHARDS_DIR).iterdir())


def test_manifest_describes_every_image_and_its_shard(tiny_params, tmp_path):
    paths = Paths(tmp_path)
    ingest_params = tiny_params.ingest.model_copy(update={"shard_size": 50})
    result = ingest(ingest_params, paths)
    manifest = pd.read_parquet(paths.raw / MANIFEST)
    assert tuple(manifest.columns) == RAW_MANIFEST_COLUMNS
    assert result.new == result.total == len(manifest)
    assert len(manifest) == tiny_params.ingest.synthetic.count - len(result.duplicates)
    assert len(shards_of(paths)) == manifest["shard"].nunique() == 4, "160 renders in shards of at most 50"
    assert stored_images(paths) == len(manifest)
    for row, data in zip(manifest.itertuples(), image_bytes(paths.raw, manifest), strict=True):
        assert row.id == hashlib.sha256(data).hexdigest()
        assert row.bytes == len(data)
        assert (row.width, row.height, row.format, row.source) == (32, 32, "png", "synthetic")
    assert manifest["id"].is_unique
    assert result.unconditional == 0 and not result.rejected


def test_ingest_is_reproducible(tiny_params, tmp_path):
    first, second = Paths(tmp_path / "a"), Paths(tmp_path / "b")
    ingest(tiny_params.ingest, first)
    ingest(tiny_params.ingest, second)
    pd.testing.assert_frame_equal(pd.read_parquet(first.raw / MANIFEST), pd.read_parquet(second.raw / MANIFEST))


def test_synthetic_rerun_adds_nothing_and_a_changed_setting_starts_afresh(tiny_params, tmp_path):
    paths = Paths(tmp_path)
    first = ingest(tiny_params.ingest, paths)
    again = ingest(tiny_params.ingest, paths)
    assert (again.new, again.unchanged, again.total) == (0, first.total, first.total)

    fewer = tiny_params.ingest.model_copy(update={"synthetic": tiny_params.ingest.synthetic.model_copy(update={"count": 10})})
    assert ingest(fewer, paths).total <= 10, "renders of other settings must not pile up in the manifest"


def test_rerun_after_adding_ten_files_reads_only_those_ten_and_writes_only_a_new_shard(tmp_path):
    folder, paths = tmp_path / "photos", Paths(tmp_path / "project")
    for shade in range(20):
        write_image(folder / f"old_{shade:02d}.png", shade)
    first = ingest(folder_params(folder), paths)
    assert (first.new, first.read, first.total) == (20, 20, 20)
    before, shards_before = pd.read_parquet(paths.raw / MANIFEST), shards_of(paths)

    for shade in range(100, 110):
        write_image(folder / f"new_{shade}.png", shade)
    second = ingest(folder_params(folder), paths)

    assert (second.new, second.unchanged, second.read, second.total) == (10, 20, 10, 30)
    after = pd.read_parquet(paths.raw / MANIFEST)
    pd.testing.assert_frame_equal(after.iloc[:20].reset_index(drop=True), before, obj="the earlier rows")
    assert sorted(after["origin"].iloc[20:]) == [f"new_{shade}.png" for shade in range(100, 110)]
    assert set(read_json(paths.raw / INDEX)["items"]) == set(after["origin"])
    shards_after = shards_of(paths)
    assert shards_after.items() >= shards_before.items(), "the earlier shards stay, byte for byte"
    (new_shard,) = set(shards_after) - set(shards_before)
    assert sorted(read_shard(paths.raw / SHARDS_DIR / new_shard, ["id"]).index) == sorted(after["id"].iloc[20:])


def test_same_content_under_another_name_is_a_duplicate_not_a_second_sample(tmp_path):
    folder, paths = tmp_path / "photos", Paths(tmp_path / "project")
    write_image(folder / "cat.png", 1)
    write_image(folder / "dog.png", 2)
    ingest(folder_params(folder), paths)

    (folder / "cat copy.png").write_bytes((folder / "cat.png").read_bytes())
    result = ingest(folder_params(folder), paths)

    assert result.duplicates == (("cat copy.png", "cat.png"),)
    assert (result.new, result.total) == (0, 2)
    assert sorted(manifest_of(paths).index) == ["cat.png", "dog.png"]
    assert stored_images(paths) == 2


def test_source_files_are_never_modified_moved_or_deleted(tmp_path):
    folder, paths = tmp_path / "photos", Paths(tmp_path / "project")
    for shade in range(5):
        write_image(folder / "cats" / f"{shade}.png", shade)
    (folder / "cats" / "0.txt").write_text("a sleepy cat\n")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.md").write_text("not ingested")
    before = tree_hashes(folder)
    stamps = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}

    ingest(folder_params(folder), paths)
    write_image(folder / "dogs" / "1.png", 99)
    ingest(folder_params(folder), paths)

    after = tree_hashes(folder)
    assert after.pop("dogs/1.png") and after == before
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items() if path.is_file())


def test_a_file_pillow_cannot_open_is_rejected_with_its_name_and_the_rest_goes_on(tmp_path):
    folder, paths = tmp_path / "photos", Paths(tmp_path / "project")
    write_image(folder / "good.png", 1)
    (folder / "truncated.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = ingest(folder_params(folder), paths)

    assert result.total == 1
    assert [(r.name, r.reason) for r in result.rejected] == [("truncated.jpg", "not an image Pillow can open (UnidentifiedImageError)")]
    rejected = pd.read_parquet(paths.raw / REJECTED)
    assert rejected.to_dict(orient="records") == [{"origin": "truncated.jpg", "reason": result.rejected[0].reason}]


def test_an_image_edited_in_place_replaces_its_row(tmp_path):
    folder, paths = tmp_path / "photos", Paths(tmp_path / "project")
    write_image(folder / "a.png", 1)
    write_image(folder / "b.png", 2)
    ingest(folder_params(folder), paths)
    first_id = manifest_of(paths).loc["a.png", "id"]

    write_image(folder / "a.png", 3, size=(30, 30))
    result = ingest(folder_params(folder), paths)

    assert (result.new, result.unchanged, result.read, result.total) == (1, 1, 1, 2)
    row = manifest_of(paths).loc["a.png"]
    assert row["id"] != first_id and (row["width"], row["height"]) == (30, 30)


def test_a_new_caption_for_an_unchanged_image_is_taken_without_reading_the_image(tmp_path):
    folder, paths = tmp_path / "photos", Paths(tmp_path / "project")
    write_image(folder / "a.png", 1)
    ingest(folder_params(folder), paths)
    assert manifest_of(paths).loc["a.png", "caption"] == ""

    (folder / "a.txt").write_text("a purple square")
    result = ingest(folder_params(folder), paths)

    assert (result.read, result.unchanged) == (0, 1)
    assert manifest_of(paths).loc["a.png", "caption"] == "a purple square"


def test_pointing_at_another_folder_starts_a_new_manifest(tmp_path):
    paths = Paths(tmp_path / "project")
    write_image(tmp_path / "one" / "a.png", 1)
    write_image(tmp_path / "two" / "b.png", 2)
    ingest(folder_params(tmp_path / "one"), paths)
    result = ingest(folder_params(tmp_path / "two"), paths)
    assert (result.new, result.total) == (1, 1)
    assert list(manifest_of(paths).index) == ["b.png"]


def test_relative_folder_paths_are_relative_to_the_project_root(tmp_path, monkeypatch):
    paths = Paths(tmp_path / "project")
    write_image(paths.root / "data" / "images" / "a.png", 1)
    monkeypatch.chdir(tmp_path)  # not the project root: the path must not depend on the working directory
    assert ingest(folder_params("data/images"), paths).total == 1


def test_merged_batches_add_to_the_configured_source(tiny_params, tmp_path):
    import json

    paths = Paths(tmp_path / "project")
    batch = paths.batches / "20261125-batch"
    for index in range(2):
        write_image(batch / f"{index}.png", shade=1000 + index)
    (batch / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": f"a {c} square"}) + "\n" for i, c in enumerate(("red", "blue"))))
    first = ingest(tiny_params.ingest, paths)
    manifest = manifest_of(paths)
    assert manifest.loc["batches/20261125-batch/1.png", "caption"] == "a blue square"
    assert first.new == first.total == tiny_params.ingest.synthetic.count - len(first.duplicates) + 2
    again = ingest(tiny_params.ingest, paths)
    assert again.new == 0 and again.total == first.total
