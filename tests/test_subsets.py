"""Named subsets (ingest.subsets): per-subset sources and caption rules, the subset column from ingest to the
latent records, per-subset validation, and training batches that draw each subset at its share, reproducibly."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.contracts.data import MANIFEST
from pipeline.contracts.paths import Paths
from pipeline.core.config import ConfigError
from pipeline.core.params_file import parse_params
from pipeline.core.source_params import CaptionRule, SubsetParams
from pipeline.data.sources import SourceError
from pipeline.stages.ingest import ingest
from pipeline.stages.validate import ValidationFailed, validate
from pipeline.training.sampling import (
    SubsetError,
    SubsetSampler,
    pass_order,
    slots_before,
    subset_sampler,
    subset_shares,
)

from .conftest import add_patterns, merge, save_random_base_model, tiny_params_dict, write_pattern


def subsets_params(subject: str, reference: str, **ingest) -> dict:
    """Tiny params with a subject folder captioned by an instance prompt and a class folder by its sidecars."""
    return merge(tiny_params_dict(), {"ingest": {
        "source": "subsets", "trigger": "sks",
        "subsets": {
            "subject": {"source": "folder", "folder": {"path": subject},
                        "caption": {"instance_prompt": "a photo of {trigger} bag"}, "weight": 1.0},
            "class": {"source": "folder", "folder": {"path": reference}, "caption": {"suffix": "bag"}, "weight": 1.0},
        }, **ingest}})


def test_caption_rules_replace_prefix_suffix_and_name_the_trigger():
    assert CaptionRule(instance_prompt="a photo of {trigger} bag").apply("a red bag", "sks") == "a photo of sks bag"
    assert CaptionRule(prefix="{trigger},", suffix=" studio ").apply("a red bag", "ohwx") == "ohwx, a red bag studio"
    assert CaptionRule(prefix="a bag").apply("", None) == "a bag", "an uncaptioned image takes the prefix alone"
    assert CaptionRule().apply("{trigger} on a table", "sks") == "sks on a table", "source captions may name it"
    assert CaptionRule().apply("a red bag", None) == "a red bag", "no rule: the source's caption, as today"


@pytest.mark.parametrize(("ingest_params", "message"), [
    ({"source": "subsets"}, r"ingest\.subsets: required when ingest\.source is subsets"),
    ({"subsets": {"a": {"source": "synthetic"}}}, r"ingest\.subsets: read only when ingest\.source is subsets"),
    ({"source": "subsets", "subsets": {"subject": {"source": "folder"}}},
     r"ingest\.subsets\.subject\.folder\.path: required when ingest\.subsets\.subject\.source is folder"),
    ({"source": "subsets", "subsets": {"subject": {"source": "synthetic", "caption": {"prefix": "{trigger}"}}}},
     r"ingest\.trigger: required, as ingest\.subsets\.subject\.caption names \{trigger\}"),
    ({"source": "subsets", "subsets": {"a": {"source": "synthetic", "weight": 2}, "b": {"source": "synthetic"}}},
     r"ingest\.subsets\.b\.weight: required, as ingest\.subsets\.a\.weight is set"),
    ({"source": "subsets", "subsets": {"a": {"source": "synthetic", "weight": 2, "repeats": 3}}},
     r"ingest\.subsets\.a\.repeats: counts only when weights are null"),
    ({"source": "subsets", "subsets": {"My Subject": {"source": "synthetic"}}}, r"ingest\.subsets: .*'My Subject'"),
    ({"source": "subsets", "subsets": {"default": {"source": "synthetic"}}}, r"ingest\.subsets: .*'default'"),
    ({"source": "subsets", "trigger": "{x}", "subsets": {"a": {"source": "synthetic"}}}, r"ingest\.trigger: "),
])
def test_bad_subset_settings_are_refused_naming_the_key(ingest_params, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"ingest": ingest_params})


def test_subsets_are_ingested_into_the_subset_column_with_their_captions(tmp_path):
    subject, reference = tmp_path / "subject", tmp_path / "class"
    for seed in range(4):
        write_pattern(subject / f"{seed}.png", seed)
    add_patterns(reference, [(24, 20)] * 8, first_seed=100)
    write_pattern(reference / "copy.png", 0)  # the subject's first image again: it stays in the subject
    params = parse_params(subsets_params(str(subject), str(reference)))
    paths = Paths(tmp_path / "project")

    result = ingest(params.ingest, paths)
    manifest = pd.read_parquet(paths.raw / MANIFEST)
    assert manifest["subset"].value_counts().to_dict() == {"subject": 4, "class": 8}
    subject_rows = manifest[manifest["subset"] == "subject"]
    assert set(subject_rows["caption"]) == {"a photo of sks bag"}
    assert subject_rows["origin"].str.startswith("subject/").all()
    class_rows = manifest[manifest["subset"] == "class"]
    assert set(class_rows["caption"]) == {f"pattern {seed} bag" for seed in range(100, 108)}
    assert set(manifest["source"]) == {"folder"}
    assert result.duplicates == (("class/copy.png", "subject/0.png"),)

    renamed = parse_params(merge(subsets_params(str(subject), str(reference)), {"ingest": {"trigger": "ohwx"}}))
    again = ingest(renamed.ingest, paths)
    assert again.read == 0, "a new trigger re-captions; it reads no image again"
    assert set(pd.read_parquet(paths.raw / MANIFEST).query("subset == 'subject'")["caption"]) == {
        "a photo of ohwx bag"}


def test_a_run_without_subsets_keeps_one_implicit_subset(tmp_path):
    add_patterns(tmp_path / "images", [(24, 20)] * 3)
    params = parse_params(merge(tiny_params_dict(), {"ingest": {"source": "folder",
                                                                "folder": {"path": str(tmp_path / "images")}}}))
    ingest(params.ingest, Paths(tmp_path / "project"))
    manifest = pd.read_parquet(tmp_path / "project" / "data" / "raw" / MANIFEST)
    assert set(manifest["subset"]) == {"default"} and set(manifest["caption"]) == {f"pattern {i}" for i in range(3)}


def test_a_subset_left_without_images_is_an_error_naming_it(tmp_path):
    add_patterns(tmp_path / "class", [(24, 20)] * 4)
    (tmp_path / "subject").mkdir()
    params = parse_params(subsets_params(str(tmp_path / "subject"), str(tmp_path / "class")))
    with pytest.raises(SourceError, match=r"ingest\.subsets\.subject: its source gave no image"):
        ingest(params.ingest, Paths(tmp_path / "project"))
    missing = parse_params(subsets_params(str(tmp_path / "nowhere"), str(tmp_path / "class")))
    with pytest.raises(SourceError, match=r"ingest\.subsets\.subject: ingest\.folder\.path: .*nowhere is not a folder"):
        ingest(missing.ingest, Paths(tmp_path / "project"))


def test_merged_batches_which_belong_to_no_subset_are_refused(tmp_path):
    add_patterns(tmp_path / "subject", [(24, 20)] * 2)
    add_patterns(tmp_path / "class", [(24, 20)] * 2, first_seed=10)
    paths = Paths(tmp_path / "project")
    write_pattern(paths.batches / "batch-1" / "new.png", 50)
    params = parse_params(subsets_params(str(tmp_path / "subject"), str(tmp_path / "class")))
    with pytest.raises(SourceError, match=r"ingest\.subsets: .*batches holds merged batches, which belong to no subset"):
        ingest(params.ingest, paths)


def test_validation_fails_naming_a_subset_that_quarantine_empties(tmp_path):
    """Two bad subject images among 40 are 4.8 % of the data set, within validate.max_bad_fraction, yet all of
    the subject: the per-subset checks fail the stage, naming it."""
    subject, reference = tmp_path / "subject", tmp_path / "class"
    for seed in range(2):
        write_pattern(subject / f"{seed}.png", seed, size=(8, 8))  # narrower than validate.min_width
    add_patterns(reference, [(24, 20)] * 38, first_seed=100)
    params = parse_params(subsets_params(str(subject), str(reference)))
    paths = Paths(tmp_path / "project")
    ingest(params.ingest, paths)
    with pytest.raises(ValidationFailed, match=r"subset subject emptied by quarantine \(ingest\.subsets\.subject\): "
                                               r"observed 2 of 2 rows"):
        validate(params.validate_, paths)
    summary = json.loads((paths.validation_reports / "summary.json").read_text())
    assert summary["bad_fraction"] <= params.validate_.max_bad_fraction
    assert summary["subsets"] == {"subject": {"total": 2, "quarantined": 2}, "class": {"total": 38, "quarantined": 0}}
    quarantine = pd.read_csv(paths.validation_reports / "quarantine.csv")
    assert quarantine["origin"].str.startswith("subject/").all() and len(quarantine) == 2


def _subsets(**shares) -> dict[str, SubsetParams]:
    return {name: SubsetParams(source="synthetic", **settings) for name, settings in shares.items()}


def test_shares_are_weights_or_images_times_repeats():
    weighted = _subsets(subject={"weight": 3.0}, reference={"weight": 1.0})
    assert subset_shares(weighted, {"subject": 12, "reference": 1000}).tolist() == [0.75, 0.25]
    repeated = _subsets(subject={"repeats": 100}, reference={})
    assert subset_shares(repeated, {"subject": 10, "reference": 1000}).tolist() == [0.5, 0.5]


def test_slot_totals_follow_the_shares_exactly_and_never_go_back():
    shares = np.array([0.55, 0.3, 0.15])
    before = np.zeros(3, dtype=np.int64)
    for slots in range(0, 20_000, 37):
        totals = slots_before(shares, slots)
        assert totals.sum() == slots and (totals >= before).all()
        assert np.abs(totals - slots * shares).max() < 1.5
        before = totals


def _sampler(seed: int = 0, batch_size: int = 8) -> SubsetSampler:
    labels = ["subject"] * 12 + ["class"] * 300
    return subset_sampler(_subsets(subject={"weight": 1.0}, **{"class": {"weight": 3.0}}), labels, 1, batch_size, seed)


def test_batches_draw_each_subset_at_its_weight_and_every_subject_image_once_a_pass():
    sampler = _sampler()
    drawn = torch.cat([sampler.batch(number)[1] for number in range(300)])
    subject = drawn[drawn < 12]
    assert len(subject) == 600, "a quarter of 2,400 samples, exactly"
    for start in range(0, 600, 12):  # 50 passes over the 12 subject images, each a permutation
        assert sorted(subject[start:start + 12].tolist()) == list(range(12))
    assert set(drawn[drawn >= 12].tolist()) == set(range(12, 312)), "the class images are all drawn too"


def test_batches_are_the_same_for_a_seed_and_a_resumed_run_draws_what_the_first_would_have():
    first = [_sampler().batch(number)[1] for number in range(40)]
    pass_order.cache_clear()
    resumed = _sampler()  # a new process: nothing carried over but the seed and the batch number
    assert all(torch.equal(first[number], resumed.batch(number)[1]) for number in range(25, 40))
    assert not all(torch.equal(a, _sampler(seed=1).batch(number)[1]) for number, a in enumerate(first))


def test_subset_sampler_refuses_what_it_cannot_draw():
    subsets = _subsets(subject={}, reference={})
    assert subset_sampler(None, ["default"] * 4, 1, 2, 0) is None, "no subsets: train's epochs, as always"
    with pytest.raises(SubsetError, match=r"ingest\.subsets\.reference: none of its images is in the train split"):
        subset_sampler(subsets, ["subject"] * 4, 1, 2, 0)
    with pytest.raises(SubsetError, match="subset other, which ingest.subsets does not name"):
        subset_sampler(subsets, ["subject", "reference", "other"], 1, 2, 0)
    with pytest.raises(SubsetError, match="preprocess.bucketing"):
        subset_sampler(subsets, ["subject", "reference"], 2, 2, 0)


@pytest.mark.e2e
def test_dvc_repro_finetunes_lora_on_two_subsets_and_resumes_exactly(tmp_path, monkeypatch):
    """`dvc repro train` of a LoRA fine-tune on a subject folder and a class folder: the subset column and the
    trigger reach the encode records; a run that crashes after a checkpoint resumes to the same batches; turning
    on mirroring re-runs encode and train only, and encode adds the mirrored latents beside those it had."""
    from pipeline.core.params_file import load_params
    from pipeline.stages import train as train_stage

    from .test_pipeline_e2e import _run, copy_repository, stages_run

    subject, reference = tmp_path / "subject", tmp_path / "class"
    for seed in range(10):
        write_pattern(subject / f"{seed}.png", seed)
    add_patterns(reference, [(24, 20)] * 20, first_seed=100)
    params = merge(subsets_params(str(subject), str(reference)), {
        "model": {"mode": "finetune", "pretrained": "models/base"},
        "train": {"steps": 6, "batch_size": 4, "sample_every": 0, "validate_every": 6, "checkpoint_every": 3}})
    root = copy_repository(tmp_path / "clone", params)
    save_random_base_model(root / "models" / "base")
    _run(["dvc", "repro", "train"], root)

    records = pd.read_parquet(root / "data" / "latents" / "train.parquet")
    assert set(records["subset"]) == {"subject", "class"}
    assert set(records.loc[records["subset"] == "subject", "caption"]) == {"a photo of sks bag"}
    assert (root / "models" / "sd" / "pytorch_lora_weights.safetensors").is_file()
    fingerprint = json.loads((root / "data" / "inputs" / "source.json").read_text())
    assert set(fingerprint["subsets"]) == {"subject", "class"} and fingerprint["subsets"]["subject"]["files"] == 10
    straight = json.loads((root / "metrics" / "train.json").read_text())

    crashed = tmp_path / "crashed"
    for folder in ("data/latents", "models/vae", "models/base"):
        shutil.copytree(root / folder, crashed / folder)
    (crashed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    settings, paths = load_params(crashed / "params.yaml"), Paths(crashed)

    def crash(*_args, **_kwargs):
        raise RuntimeError("killed before export")

    with monkeypatch.context() as patched:
        patched.setattr(train_stage, "export", crash)
        with pytest.raises(RuntimeError, match="killed before export"):
            train_stage.train(settings, paths, tracked=False)
    resumed = train_stage.train(settings, paths, tracked=False)
    written = json.loads((paths.metrics / "train.json").read_text())
    assert resumed["resumed_from_step"] == 3
    assert written["data_digest"] == straight["data_digest"]
    assert written["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-5)

    params["train"]["random_flip"] = True
    params["encode"]["mirrored"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = _run(["dvc", "repro", "train"], root)
    assert stages_run(again.stdout) == {"inputs", "encode", "train"}, again.stdout
    samples = len(pd.read_parquet(root / "data" / "validated" / MANIFEST))
    assert f"latents {samples} encoded, {samples} reused" in again.stderr, "only the mirrored images are new"
