"""DVC sees the inputs params.yaml names outside its files: the image folder, the pretrained model, the prompts.

The `inputs` stage fingerprints them (pipeline/stages/inputs.py); a stage that reads one depends on its
fingerprint (tests/test_dependencies.py checks that every such stage lists it).
"""

from __future__ import annotations

import os

import pytest
import yaml

from pipeline.contracts.paths import Paths
from pipeline.core.params_file import parse_params
from pipeline.core.project import DVC_ROOT_ENV
from pipeline.stages.inputs import location_fingerprint, source_fingerprint

from .conftest import merge, tiny_params_dict, write_pattern
from .test_pipeline_e2e import _run, copy_repository, stages_run


def folder_params(path: str) -> dict:
    return merge(tiny_params_dict(), {"ingest": {"source": "folder", "folder": {"path": path}},
                                      "validate": {"min_rows": 2}})


def test_a_folder_source_fingerprint_changes_with_its_images_and_captions_and_only_then(tmp_path):
    images = tmp_path / "images"
    for seed in range(3):
        write_pattern(images / f"{seed}.png", seed)
    params, paths = parse_params(folder_params(str(images))).ingest, Paths(tmp_path / "project")
    first = source_fingerprint(params, paths)
    assert first["files"] == 3 and source_fingerprint(params, paths) == first

    changes = [lambda: (images / "0.txt").write_text("a red cat", encoding="utf-8"),  # a new caption
               lambda: write_pattern(images / "3.png", 3),  # a new image
               lambda: write_pattern(images / "1.png", 11),  # an image edited in place
               lambda: (images / "2.png").unlink()]  # an image removed
    seen = [first["sha256"]]
    for change in changes:
        change()
        seen.append(source_fingerprint(params, paths)["sha256"])
    assert len(set(seen)) == len(seen), seen


def test_a_model_folder_is_fingerprinted_by_its_files_a_hub_id_by_its_name_a_prompts_file_by_its_text(tmp_path):
    paths = Paths(tmp_path)
    (tmp_path / "base" / "unet").mkdir(parents=True)
    weights = tmp_path / "base" / "unet" / "model.safetensors"
    weights.write_bytes(b"0" * 64)
    before = location_fingerprint("base", paths)
    weights.write_bytes(b"1" * 65)
    assert location_fingerprint("base", paths) != before
    assert location_fingerprint("owner/model", paths) == {
        "input": "owner/model", "watched": "by name only (a hub id or URL, not a path here)"}
    assert location_fingerprint(None, paths) == {"input": None}

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n", encoding="utf-8")
    first = location_fingerprint("prompts.txt", paths, by_content=True)
    prompts.write_text("a blue square\n", encoding="utf-8")
    os.utime(prompts, ns=(0, 0))
    assert location_fingerprint("prompts.txt", paths, by_content=True) != first


def test_in_an_experiments_copy_an_input_is_read_from_the_project(tmp_path, monkeypatch):
    """`dvc exp run --temp` runs the stages in a copy under .dvc/tmp/exps without the user's folder; DVC
    names the project in DVC_ROOT, and the inputs are read from there."""
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "run"
    monkeypatch.setenv(DVC_ROOT_ENV, str(tmp_path))
    assert Paths(copy).input("data/images") == tmp_path / "data" / "images"
    assert Paths(copy).raw == copy / "data" / "raw"
    monkeypatch.delenv(DVC_ROOT_ENV)
    assert Paths(copy).input("data/images") == copy / "data" / "images"


@pytest.mark.e2e
def test_dvc_repro_ingests_an_image_added_to_the_users_folder(tmp_path):
    """Without the fingerprint DVC saw no changed dep and skipped ingest; the README said
    `dvc repro -f -s ingest`."""
    root = copy_repository(tmp_path, folder_params("data/images"))
    images = root / "data" / "images"
    for seed in range(4):
        write_pattern(images / f"{seed}.png", seed)
        (images / f"{seed}.txt").write_text(f"a pattern number {seed}", encoding="utf-8")
    manifest = root / "data" / "raw" / "manifest.parquet"

    first = _run(["dvc", "repro", "ingest"], root).stdout
    assert stages_run(first) == {"inputs", "class_images", "ingest"}, first
    again = _run(["dvc", "repro", "ingest"], root).stdout
    assert stages_run(again) == {"inputs"} and "Stage 'ingest' didn't change" in again, again

    write_pattern(images / "4.png", 4)
    added = _run(["dvc", "repro", "ingest"], root).stdout
    assert stages_run(added) == {"inputs", "ingest"}, added
    import pandas as pd

    assert len(pd.read_parquet(manifest)) == 5
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert "data/inputs/source.json" in {dep["path"] for dep in lock["stages"]["ingest"]["deps"]}
