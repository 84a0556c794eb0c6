"""Each source layout ingests through the one stage function; bad input is named or rejected, never lost."""

import hashlib
import io
import json
import tarfile

import fsspec
import pandas as pd
import pytest
from PIL import Image

from pipeline.contracts.data import MANIFEST
from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError
from pipeline.core.params_file import parse_params
from pipeline.data.sources import SourceError
from pipeline.stages.ingest import ingest

from .conftest import write_image


def run_ingest(tmp_path, source, **settings):
    params = parse_params({"ingest": {"source": source, source: settings}}).ingest
    paths = Paths(tmp_path / "project")
    result = ingest(params, paths)
    return result, pd.read_parquet(paths.raw / MANIFEST).set_index("origin")


def captions(manifest):
    return manifest["caption"].to_dict()


# --- folder: imagefolder metadata ---------------------------------------------------------------

def test_imagefolder_with_metadata_jsonl(tmp_path):
    folder = tmp_path / "images"
    for shade, name in enumerate(["a.png", "b.png", "c.png", "d.png"]):
        write_image(folder / name, shade)
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "a red fox"}\n'
        '{"file_name": "b.png", "text": ""}\n'
        '{"file_name": "c.png", "text": null}\n'
    )
    result, manifest = run_ingest(tmp_path, "folder", path=str(folder))
    assert captions(manifest) == {"a.png": "a red fox", "b.png": "", "c.png": "", "d.png": ""}
    assert (result.new, result.unconditional, result.rejected) == (4, 3, ())
    assert (manifest["source"] == "folder").all()


def test_imagefolder_with_metadata_csv_in_a_split_folder_and_a_chosen_caption_column(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "train" / "x.png", 1)
    write_image(folder / "train" / "y.jpg", 2, fmt="JPEG")
    (folder / "train" / "metadata.csv").write_text("file_name,caption,score\nx.png,a blue bird,3\ny.jpg,NA,1\n")
    _, manifest = run_ingest(tmp_path, "folder", path=str(folder), caption_column="caption")
    # A metadata caption wins over the sub-folder name, and "NA" is a caption, not a missing value.
    assert captions(manifest) == {"train/x.png": "a blue bird", "train/y.jpg": "NA"}
    assert manifest.loc["train/y.jpg", "format"] == "jpeg"


def test_metadata_without_the_caption_column_names_the_file_and_the_key(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "a.png", 1)
    (folder / "metadata.csv").write_text("file_name,text\na.png,a cat\n")
    with pytest.raises(SourceError, match=r"metadata\.csv: no column 'caption' \(set by ingest\.folder\.caption_column\)"):
        run_ingest(tmp_path, "folder", path=str(folder), caption_column="caption")


def test_malformed_metadata_jsonl_names_the_file_and_line(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "a.png", 1)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", \n')
    with pytest.raises(SourceError, match=r"metadata\.jsonl: line 2 is not valid JSON"):
        run_ingest(tmp_path, "folder", path=str(folder))


def test_metadata_rows_outside_the_folder_or_missing_are_rejected_with_row_and_reason(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "a.png", 1)
    write_image(tmp_path / "secret.png", 2)
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "ok"}\n'
        '{"file_name": "../secret.png", "text": "escapes"}\n'
        '{"file_name": "gone.png", "text": "missing"}\n'
    )
    result, manifest = run_ingest(tmp_path, "folder", path=str(folder))
    assert list(manifest.index) == ["a.png"]
    assert {r.name: r.reason for r in result.rejected} == {
        "../secret.png": "metadata.jsonl row 2: file_name '../secret.png' points outside the data folder",
        "gone.png": "metadata.jsonl row 3: file not found: gone.png",
    }


# --- folder: sidecar captions and class sub-folders ------------------------------------------------

def test_sidecar_caption_files(tmp_path):
    folder = tmp_path / "kohya"
    write_image(folder / "photo.png", 1)
    (folder / "photo.caption").write_text("  a girl with an umbrella, rain\n")
    write_image(folder / "other.png", 2)
    (folder / "other.txt").write_text("ignored: not the configured extension")
    _, manifest = run_ingest(tmp_path, "folder", path=str(folder), caption_extension=".caption")
    assert captions(manifest) == {"other.png": "", "photo.png": "a girl with an umbrella, rain"}


def test_class_sub_folders_become_captions_from_the_template(tmp_path):
    folder = tmp_path / "pets"
    write_image(folder / "cats" / "1.png", 1)
    write_image(folder / "golden_retriever" / "1.png", 2)
    _, manifest = run_ingest(tmp_path, "folder", path=str(folder), label_template="a photo of a {label}")
    assert captions(manifest) == {"cats/1.png": "a photo of a cats",
                                  "golden_retriever/1.png": "a photo of a golden retriever"}


def test_mixed_labelled_partly_labelled_and_unlabelled_images_are_all_kept(tmp_path):
    folder = tmp_path / "mixed"
    write_image(folder / "listed.png", 1)
    (folder / "metadata.jsonl").write_text('{"file_name": "listed.png", "text": "from metadata"}\n')
    write_image(folder / "sidecar.png", 2)
    (folder / "sidecar.txt").write_text("from a sidecar")
    write_image(folder / "dogs" / "d.webp", 3, fmt="WEBP")
    write_image(folder / "bare.PNG", 4)
    write_image(folder / ".hidden" / "skip.png", 5)
    (folder / ".hidden" / "metadata.jsonl").write_text('{"file_name": "skip.png", "text": "skipped"}\n')
    result, manifest = run_ingest(tmp_path, "folder", path=str(folder))
    assert captions(manifest) == {"bare.PNG": "", "dogs/d.webp": "a photo of a dogs",
                                  "listed.png": "from metadata", "sidecar.png": "from a sidecar"}
    assert result.unconditional == 1


def test_a_folder_holding_the_pipeline_data_is_refused(tmp_path):
    with pytest.raises(SourceError, match=r"ingest\.folder\.path: .* contains the pipeline's .*data/raw"):
        run_ingest(tmp_path, "folder", path="data")


def test_a_folder_that_does_not_exist_names_the_key(tmp_path):
    with pytest.raises(SourceError, match=r"ingest\.folder\.path: .*nowhere is not a folder"):
        run_ingest(tmp_path, "folder", path=str(tmp_path / "nowhere"))


# --- manifest -------------------------------------------------------------------------------------

MANIFEST_ROWS = [
    {"path": "img/a.png", "text": "a red circle"},
    {"path": "img/b.png", "text": ""},
    {"path": "../outside.png", "text": "escapes the data root"},
    {"path": "img/missing.png", "text": "no such file"},
]


def write_manifest(folder, suffix, rows):
    path = folder / f"list{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_manifest_files_ingest_and_bad_rows_are_recorded_not_fatal(tmp_path, suffix):
    data = tmp_path / "data"
    write_image(data / "img" / "a.png", 1)
    write_image(data / "img" / "b.png", 2)
    write_image(tmp_path / "outside.png", 3)
    manifest_file = write_manifest(data, suffix, MANIFEST_ROWS)

    result, manifest = run_ingest(tmp_path, "manifest", path=str(manifest_file))

    assert captions(manifest) == {"img/a.png": "a red circle", "img/b.png": ""}
    assert manifest.loc["img/a.png", "id"] == hashlib.sha256((data / "img" / "a.png").read_bytes()).hexdigest()
    reasons = {r.name: r.reason for r in result.rejected}
    assert reasons["../outside.png"].startswith(f"list{suffix} row 3: path '../outside.png' leads outside")
    assert reasons["img/missing.png"].startswith(f"list{suffix} row 4: file not found")
    assert (result.new, result.unconditional) == (2, 1)


def test_manifest_without_the_path_column_names_the_key(tmp_path):
    manifest_file = write_manifest(tmp_path, ".csv", [{"file": "a.png", "text": "x"}])
    with pytest.raises(SourceError, match=r"no column 'path' \(set by ingest\.manifest\.path_column\).*'file'"):
        run_ingest(tmp_path, "manifest", path=str(manifest_file))


def test_manifest_with_chosen_columns(tmp_path):
    write_image(tmp_path / "a.png", 1)
    manifest_file = write_manifest(tmp_path, ".csv", [{"file": "a.png", "prompt": "a cat"}])
    _, manifest = run_ingest(tmp_path, "manifest", path=str(manifest_file), path_column="file", caption_column="prompt")
    assert captions(manifest) == {"a.png": "a cat"}


# --- hf ---------------------------------------------------------------------------------------------

def save_hf_dataset(folder, captions, *, splits=None):
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (20, 16), (shade * 40, 10, 10)) for shade in range(len(captions))]
    dataset = datasets.Dataset.from_dict({"image": images, "text": captions}).cast_column("image", datasets.Image())
    (datasets.DatasetDict({name: dataset for name in splits}) if splits else dataset).save_to_disk(str(folder))


def test_hf_dataset_saved_to_disk(tmp_path):
    save_hf_dataset(tmp_path / "hfds", ["a red circle", "", "a blue square"])
    result, manifest = run_ingest(tmp_path, "hf", path_or_id=str(tmp_path / "hfds"))
    assert captions(manifest) == {"row 0": "a red circle", "row 1": "", "row 2": "a blue square"}
    assert (result.new, result.unconditional) == (3, 1)
    assert (manifest["width"].tolist(), manifest["height"].tolist()) == ([20] * 3, [16] * 3)

    again, _ = run_ingest(tmp_path, "hf", path_or_id=str(tmp_path / "hfds"))
    assert (again.new, again.unchanged, again.read) == (0, 3, 0), "an unchanged dataset is not read again"


def test_hf_dataset_dict_picks_the_split_and_names_a_wrong_one(tmp_path):
    save_hf_dataset(tmp_path / "hfds", ["a", "b"], splits=["train", "test"])
    result, _ = run_ingest(tmp_path, "hf", path_or_id=str(tmp_path / "hfds"), split="test")
    assert result.total == 2
    with pytest.raises(SourceError, match=r"ingest\.hf\.split: 'validation' is not a split .*\['test', 'train'\]"):
        run_ingest(tmp_path, "hf", path_or_id=str(tmp_path / "hfds"), split="validation")


def test_hf_missing_column_names_the_key(tmp_path):
    save_hf_dataset(tmp_path / "hfds", ["a"])
    with pytest.raises(SourceError, match=r"ingest\.hf\.caption_column: no column 'caption'"):
        run_ingest(tmp_path, "hf", path_or_id=str(tmp_path / "hfds"), caption_column="caption")


def test_hf_local_path_that_is_missing_or_no_dataset_names_the_key(tmp_path):
    with pytest.raises(SourceError, match=r"ingest\.hf\.path_or_id: .*missing does not exist"):
        run_ingest(tmp_path, "hf", path_or_id="./missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SourceError, match=r"ingest\.hf\.path_or_id: .*plain is not a dataset written by"):
        run_ingest(tmp_path, "hf", path_or_id=str(tmp_path / "plain"))


# --- webdataset: img2dataset's shards ---------------------------------------------------------------

def encoded_image(shade: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), (shade, 255 - shade, 128)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shard(filesystem, path: str, samples: dict[str, dict[str, bytes]]) -> None:
    """An img2dataset shard: `{key}.jpg|png` + `{key}.txt` + `{key}.json` per sample, and `{shard}.parquet`."""
    with filesystem.open(path, "wb") as stream, tarfile.open(fileobj=stream, mode="w") as archive:
        for key, files in samples.items():
            for suffix, data in files.items():
                member = tarfile.TarInfo(f"{key}{suffix}")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
    metadata = pd.DataFrame({"key": list(samples), "status": "success"})
    with filesystem.open(path.removesuffix(".tar") + ".parquet", "wb") as stream:
        metadata.to_parquet(stream)


def sample(image: bytes | None, caption: str | None, suffix: str = ".png") -> dict[str, bytes]:
    files = {} if image is None else {suffix: image}
    if caption is not None:
        files[".txt"] = caption.encode()
    return files | {".json": json.dumps({"url": "https://example.com/x", "status": "success"}).encode()}


SHARD_0 = {
    "000000000": sample(encoded_image(10), "a red fox"),
    "000000001": sample(encoded_image(20, "JPEG"), None, ".jpg"),  # no caption: an unconditional sample
    "000000002": sample(b"\xff\xd8 not a jpeg", "a broken picture", ".jpg"),
    "000000003": sample(None, "a caption without its image"),
}
SHARD_1 = {"000010000": sample(encoded_image(30), "a blue square"),
           "000010001": sample(encoded_image(40, "WEBP"), "a green circle", ".webp")}


# The URL case is a file:// URL: the items are read in Ray's worker processes, which an in-memory
# filesystem (memory://) would not reach; any fsspec protocol goes through the same code.
@pytest.mark.parametrize("where", ["folder", "url"])
def test_webdataset_shards_ingest_once_and_a_new_shard_is_read_alone(tmp_path, where):
    location = str(tmp_path / "shards") if where == "folder" else f"file://{tmp_path}/shards"
    filesystem, root = fsspec.core.url_to_fs(location)
    filesystem.makedirs(root, exist_ok=True)
    write_shard(filesystem, f"{root}/00000.tar", SHARD_0)
    write_shard(filesystem, f"{root}/00001.tar", SHARD_1)

    first, manifest = run_ingest(tmp_path, "webdataset", path=location)
    assert captions(manifest) == {"00000.tar/000000000": "a red fox", "00000.tar/000000001": "",
                                  "00001.tar/000010000": "a blue square", "00001.tar/000010001": "a green circle"}
    assert manifest.loc["00001.tar/000010001", "format"] == "webp"
    assert (first.new, first.read, first.unconditional) == (4, 5, 1)
    assert {rejected.name: rejected.reason for rejected in first.rejected} == {
        "00000.tar/000000002": "not an image Pillow can open (UnidentifiedImageError)",
        "00000.tar/000000003": "00000.tar: sample 000000003 has no image (.jpg, .png or .webp), only .json, .txt",
    }

    again, _ = run_ingest(tmp_path, "webdataset", path=location)
    # Nothing new; only the rejected broken image is read again (ingest keeps no stamp for rejects).
    assert (again.new, again.unchanged, again.read, len(again.rejected)) == (0, 4, 1, 2)

    write_shard(filesystem, f"{root}/00002.tar", {"000020000": sample(encoded_image(50), "a white star"),
                                                  "000020001": sample(encoded_image(60), "a black moon")})
    grown, manifest = run_ingest(tmp_path, "webdataset", path=location)
    assert (grown.new, grown.unchanged, grown.read) == (2, 4, 3)
    assert manifest.loc["00002.tar/000020001", "caption"] == "a black moon"


def test_webdataset_without_shards_or_with_a_broken_shard_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"ingest\.webdataset\.path: no \.tar shards at .*empty"):
        run_ingest(tmp_path, "webdataset", path=str(tmp_path / "empty"))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"not a tar archive at all" * 40)
    write_shard(fsspec.filesystem("file"), str(shards / "00001.tar"), SHARD_1)
    write_shard(fsspec.filesystem("file"), str(shards / "00002.tar"),
                {"000020000": {".png": encoded_image(70), ".txt": b"caf\xe9 latin-1"}})
    result, manifest = run_ingest(tmp_path, "webdataset", path=str(shards / "*.tar"))
    assert result.new == 2 and len(manifest) == 2
    reasons = {rejected.name: rejected.reason for rejected in result.rejected}
    assert reasons.keys() == {"00000.tar", "00002.tar/000020000"}
    assert reasons["00000.tar"].startswith("00000.tar: not a readable tar archive")
    assert reasons["00002.tar/000020000"] == ("00002.tar: caption 000020000.txt is not UTF-8 text "
                                               "(invalid continuation byte at byte 3)")


# --- configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ingest_params", "message"), [
    ({"source": "folder"}, r"ingest\.folder\.path: required when ingest\.source is folder"),
    ({"source": "manifest"}, r"ingest\.manifest\.path: required when ingest\.source is manifest"),
    ({"source": "hf", "hf": {}}, r"ingest\.hf\.path_or_id: required"),
    ({"source": "folder", "folder": {"path": "x", "caption_col": "text"}}, r"ingest\.folder\.caption_col: unknown key"),
    ({"source": "webdataset"}, r"ingest\.webdataset\.path: required when ingest\.source is webdataset"),
    ({"source": "s3"}, r"ingest\.source: .*'synthetic', 'folder', 'manifest', 'hf', 'webdataset' or 'subsets'"),
    ({"source": "folder", "folder": {"path": "x", "label_template": "a {cls}"}}, r"ingest\.folder\.label_template: .*\{label\}"),
    ({"source": "folder", "folder": {"path": "x", "extensions": ["png"]}}, r"ingest\.folder\.extensions: .*dot"),
])
def test_missing_or_unknown_source_settings_are_named(ingest_params, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"ingest": ingest_params})
