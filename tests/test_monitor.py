"""Monitoring: drift on new batches against the training set, and the retraining decision."""

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

from pipeline.contracts.data import load_split
from pipeline.contracts.paths import Paths
from pipeline.core.config import MonitorParams
from pipeline.core.params_file import parse_params
from pipeline.monitor import (
    BatchReport,
    _sample_reference,
    batch_manifest,
    check_batch,
    decide,
    drop_demo_batch,
    merge_batches,
    pending_batches,
)
from pipeline.stages.preprocess import preprocess

from .conftest import folder_project, merge, tiny_params_dict


@pytest.fixture(scope="module")
def checked(trained_project, tmp_path_factory):
    """One batch of each kind dropped into a fresh incoming folder and checked against the champion."""
    _, paths = trained_project
    incoming = tmp_path_factory.mktemp("incoming")
    params = parse_params(merge(tiny_params_dict(), {"monitor": {"incoming": str(incoming)}}))
    champion_mse = json.loads((paths.metrics / "eval.json").read_text())["noise_mse"]
    folders = {shift: drop_demo_batch(params, paths, shift=shift, count=100, seed=7) for shift in
               ("none", "colour", "background")}
    before = {shift: _tree_hash(folder) for shift, folder in folders.items()}
    reports = {shift: check_batch(folder, params, paths, paths.sd_model, champion_mse)
               for shift, folder in folders.items()}
    return params, paths, folders, reports, before


def _tree_hash(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.name.encode() + (path.read_bytes() if path.is_file() else b""))
    return digest.hexdigest()


def test_an_unshifted_batch_shows_no_drift(checked):
    _, _, _, reports, _ = checked
    report = reports["none"]
    assert report.samples == report.valid == 100
    assert report.drifted_features == [] and not report.latents_drifted
    assert set(report.champion) == {"noise_mse_batch", "noise_mse_validation", "degradation"}


def test_new_colours_and_a_dark_background_drift(checked):
    _, _, _, reports, _ = checked
    assert "oov_rate" in reports["colour"].drifted_features
    assert "brightness" in reports["background"].drifted_features
    assert reports["background"].latents_drifted
    assert reports["background"].mmd["pvalue"] < reports["none"].mmd["pvalue"]


def test_batches_are_read_never_modified(checked):
    _, _, folders, _, before = checked
    assert {shift: _tree_hash(folder) for shift, folder in folders.items()} == before


def test_policy_retrains_on_a_shifted_batch_but_not_on_an_unshifted_one(checked):
    _, _, _, reports, _ = checked
    policy = MonitorParams(min_new_samples=50)
    quiet = decide([reports["none"]], policy)
    assert not quiet.retrain and "no drift" in quiet.reasons[-1]
    shifted = decide([reports["none"], reports["background"]], policy)
    assert shifted.retrain and shifted.new_samples == 200
    assert any("brightness" in reason for reason in shifted.reasons)


def test_policy_waits_for_enough_new_data():
    drifted = BatchReport(batch="b", samples=10, valid=10, validation={}, drifted_features=["brightness"],
                          features={"brightness": {"psi": 3.0, "ks_pvalue": 1e-9}})
    decision = decide([drifted], MonitorParams(min_new_samples=100))
    assert not decision.retrain and "10 valid new samples" in decision.reasons[0]
    assert "waiting for more data" in decision.reasons[-1]


def test_bad_files_in_a_batch_are_quarantined_and_merging_keeps_only_good_ones(checked, tmp_path):
    params, _, folders, _, _ = checked
    batch = tmp_path / "incoming" / "with-bad-file"
    batch.mkdir(parents=True)
    source = folders["none"]
    lines = (source / "metadata.jsonl").read_text().splitlines()[:20]  # 1 bad of 21: within max_bad_fraction
    for line in lines:
        name = json.loads(line)["file_name"]
        (batch / name).write_bytes((source / name).read_bytes())
    (batch / "broken.png").write_bytes(b"not a png")
    (batch / "metadata.jsonl").write_text("\n".join(lines + ['{"file_name": "broken.png", "text": "a red circle"}']))
    manifest = batch_manifest(batch)
    assert len(manifest) == 21 and (manifest["format"] == "unreadable").sum() == 1
    paths = Paths(tmp_path / "project")
    assert merge_batches([batch], params, paths) == 20
    merged = paths.batches / "with-bad-file"
    assert not (merged / "broken.png").exists() and len((merged / "metadata.jsonl").read_text().splitlines()) == 20
    monitor = MonitorParams(incoming=str(tmp_path / "incoming"))
    assert pending_batches(monitor, paths) == []


def test_a_malformed_metadata_line_is_named(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{"text": "no file"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl: row 2 has no file_name"):
        batch_manifest(tmp_path)


SHAPES = [(24, 20), (40, 20), (20, 40), (48, 24)] * 5


def test_reference_images_are_the_training_squares_without_bucketing(tmp_path):
    params, paths = folder_project(tmp_path, SHAPES, val_fraction=0.2)
    preprocess(params.preprocess, paths)
    train, _ = load_split(paths, "train")
    chosen = np.sort(np.random.default_rng(4).choice(len(train), size=5, replace=False))
    assert np.array_equal(_sample_reference(paths, 5, 4, 32), train[chosen])


def test_reference_images_are_squares_when_the_train_split_is_bucketed(tmp_path):
    params, paths = folder_project(tmp_path, SHAPES, val_fraction=0.2, bucketing=True)
    counts = preprocess(params.preprocess, paths)
    reference = _sample_reference(paths, 100, 0, 32)
    assert reference.shape == (counts["train"], 32, 32, 3) and reference.dtype == np.uint8


def test_the_retrain_flows_commands_write_their_results_as_json(checked, tmp_path):
    """`sdpipe check-batch` and `sdpipe decide`, as the retrain flow runs them, give what the functions give."""
    import yaml

    from pipeline.cli import main

    params, paths, folders, reports, _ = checked
    (paths.root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    project = ["--params", str(paths.root / "params.yaml")]
    report = tmp_path / "report.json"
    assert main([*project, "check-batch", str(folders["background"]), "--champion", str(paths.sd_model),
                 "--champion-mse", str(reports["background"].champion["noise_mse_validation"]),
                 "--out", str(report)]) == 0
    written = json.loads(report.read_text())
    assert written["drifted_features"] == reports["background"].drifted_features
    assert written["mmd"]["pvalue"] == pytest.approx(reports["background"].mmd["pvalue"])
    decision = tmp_path / "decision.json"
    assert main([*project, "decide", str(report), "--out", str(decision)]) == 0
    assert json.loads(decision.read_text())["reasons"] == decide([reports["background"]], params.monitor).reasons


def test_a_batch_that_failed_a_hard_check_counts_for_nothing_in_the_decision(checked):
    params, _, _, reports, _ = checked
    validation = reports["background"].validation
    broken = replace(reports["background"], batch="broken-upload", validation={
        **validation, "hard_checks": {**validation["hard_checks"], "min_rows": {"passed": False, "observed": 3}}})
    assert broken.failed_checks, "the report must read as a failed hard check"
    alone = decide([broken], params.monitor)
    assert not alone.retrain and alone.new_samples == 0
    assert any(reason.startswith("broken-upload: left out, it failed the hard checks") for reason in alone.reasons)
    beside = decide([reports["none"], broken], params.monitor)
    assert beside.new_samples == reports["none"].valid


def test_a_batch_below_the_minimum_rows_is_not_merged_and_stays_pending(checked, tmp_path):
    params, _, folders, _, _ = checked
    batch = tmp_path / "incoming" / "too-small"
    batch.mkdir(parents=True)
    lines = (folders["none"] / "metadata.jsonl").read_text().splitlines()[:3]  # validate.min_rows is 10
    for line in lines:
        name = json.loads(line)["file_name"]
        (batch / name).write_bytes((folders["none"] / name).read_bytes())
    (batch / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    paths = Paths(tmp_path / "project")
    assert merge_batches([batch], params, paths) == 0
    assert not (paths.batches / "too-small").exists()
    assert pending_batches(MonitorParams(incoming=str(tmp_path / "incoming")), paths) == [batch]


def test_each_checked_batch_is_its_own_step_of_the_monitoring_series(checked, tmp_path):
    import mlflow

    from pipeline.monitor import BATCH_SERIES, log_monitoring

    params, _, _, reports, _ = checked
    paths = Paths(tmp_path)
    first = [reports["none"], reports["colour"]]
    run_id = log_monitoring(params, paths, first, decide(first, params.monitor))
    assert log_monitoring(params, paths, [reports["background"]], decide([reports["background"]], params.monitor)) == run_id
    client = mlflow.MlflowClient()
    series = client.get_metric_history(run_id, BATCH_SERIES)
    assert sorted(metric.step for metric in series) == [0, 1, 2]
    tags = client.get_run(run_id).data.tags
    assert [tags[f"batch.{step}"] for step in range(3)] == [reports[name].batch for name in ("none", "colour", "background")]
    assert [m.step for m in client.get_metric_history(run_id, "retrain")] == [1, 2]


def test_pending_batches_before_any_champion_says_so_and_succeeds(tmp_path, capsys):
    """The first scheduled retrain of a fresh deployment: batches wait, no traceback, the flow goes on."""
    import yaml

    from pipeline.cli import main

    incoming = tmp_path / "incoming" / "first"
    incoming.mkdir(parents=True)
    params = merge(tiny_params_dict(), {"monitor": {"incoming": str(tmp_path / "incoming")}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "plan.json"
    assert main(["--params", str(tmp_path / "params.yaml"), "pending-batches", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["batches"] == [str(incoming)] and "champion" not in plan
    assert "no champion" in plan["no_champion"].lower(), plan
    assert "not checked" in capsys.readouterr().out
