import json
import shutil

import mlflow
import pytest
import yaml
from safetensors.torch import load_file, save_file

from pipeline.contracts.paths import Paths
from pipeline.contracts.records import CHALLENGER, CHAMPION, MODEL_CARD, call_in_card
from pipeline.core.atomic import write_json
from pipeline.core.config import ConfigError, RegisterParams
from pipeline.stages.register import choose_gate, gate_passes, register, untrusted_reason
from pipeline.tracking.runs import tracking_uri

from .conftest import tiny_params_dict


@pytest.fixture
def project_copy(trained_project, tmp_path):
    """The trained project with an empty MLflow store, as after deleting mlflow.db."""
    params, paths = trained_project
    root = tmp_path / "project"
    shutil.copytree(paths.root, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return params, Paths(root)


def _client(params, paths):
    mlflow.set_tracking_uri(tracking_uri(params.register_, paths.root))
    return mlflow.MlflowClient()


def _retrain(paths: Paths, adherence: float) -> None:
    """A different model (perturbed weights) with a different evaluation result."""
    weights = paths.sd_model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    metrics = json.loads((paths.metrics / "eval.json").read_text())
    write_json(paths.metrics / "eval.json", {**metrics, "adherence": adherence})


def test_first_version_becomes_champion_with_lineage(trained_project):
    params, paths = trained_project
    client = _client(params, paths)
    version = client.get_model_version_by_alias(params.register_.model_name, CHAMPION)
    assert version.version == 1
    assert {"git_commit", "data_version", "params_hash", "model_hash", "metric.adherence"} <= set(version.tags)
    recorded = json.loads((paths.metrics / "eval.json").read_text())
    assert f"| adherence | {recorded['adherence']:.4g} |" in version.description
    assert version.tags["git_commit"] in version.description
    call = call_in_card((paths.sd_model / MODEL_CARD).read_text())
    assert call and f"```python\n{call}```" in version.description, "the version shows the model card's call"


def test_models_lists_the_versions_and_the_champions_plain_diffusers_call(project_copy, capsys):
    from pipeline.cli import main

    params, paths = project_copy
    register(params, paths)
    (paths.root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    assert main(["--params", str(paths.root / "params.yaml"), "models"]) == 0
    printed = capsys.readouterr().out
    assert "champion" in printed and call_in_card((paths.sd_model / MODEL_CARD).read_text()) in printed


def test_registering_the_same_files_twice_makes_no_new_version(project_copy):
    params, paths = project_copy
    first = register(params, paths)
    again = register(params, paths)
    assert (first.version, first.promoted) == (1, True)
    assert (again.version, again.reused_existing_version, again.promoted) == (1, True, False)
    assert len(_client(params, paths).search_model_versions(f"name = '{params.register_.model_name}'")) == 1


def test_worse_model_is_challenger_and_better_model_is_promoted(project_copy):
    params, paths = project_copy
    metrics = json.loads((paths.metrics / "eval.json").read_text())
    register(params, paths)
    client = _client(params, paths)
    name = params.register_.model_name

    _retrain(paths, adherence=metrics["adherence"] - 0.1)
    worse = register(params, paths)
    assert (worse.version, worse.promoted, worse.champion_version) == (2, False, 1)
    assert client.get_model_version_by_alias(name, CHALLENGER).version == 2
    assert client.get_model_version_by_alias(name, CHAMPION).version == 1

    _retrain(paths, adherence=metrics["adherence"] + 0.1)
    better = register(params, paths)
    assert (better.version, better.promoted) == (3, True)
    assert client.get_model_version_by_alias(name, CHAMPION).version == 3


def test_unknown_gate_metric_is_named(project_copy):
    params, paths = project_copy
    wrong = params.model_copy(update={"register_": RegisterParams(gate_metric="fdi")})
    with pytest.raises(ConfigError, match="register.gate_metric: 'fdi'"):
        register(wrong, paths)


def test_a_gate_metric_evaluate_could_not_compute_refuses_promotion_with_its_reason(project_copy):
    params, paths = project_copy
    fid_gate = params.model_copy(update={"register_": RegisterParams(gate_metric="fid")})
    result = register(fid_gate, paths)
    assert (result.version, result.promoted, result.champion_version, result.gate_value) == (1, False, None, None)
    assert result.refused.startswith("fid is not in eval.json: no Inception weights")
    version = _client(params, paths).get_model_version(params.register_.model_name, "1")
    assert version.tags["gate.metric"] == "fid" and version.tags["gate.direction"] == "minimize"
    assert version.tags["gate.outcome"].startswith("refused: fid is not in eval.json")
    assert json.loads((paths.metrics / "registry.json").read_text())["refused"] == result.refused


def test_auto_gate_on_the_synthetic_source_is_adherence(trained_project):
    params, paths = trained_project
    recorded = json.loads((paths.metrics / "registry.json").read_text())
    assert (recorded["gate_metric"], recorded["gate_direction"]) == ("adherence", "maximize")
    assert recorded["gate_rule"].startswith("auto: the synthetic source") and recorded["refused"] is None
    version = _client(params, paths).get_model_version(params.register_.model_name, "1")
    assert (version.tags["gate.metric"], version.tags["gate.outcome"]) == ("adherence", "promoted")


@pytest.mark.parametrize(
    ("metrics", "metric", "direction"),
    [
        ({"adherence": 0.9, "noise_mse": 0.1}, "adherence", "maximize"),
        ({"label_adherence": 0.9, "classifier_accuracy": 0.95, "noise_mse": 0.1}, "label_adherence", "maximize"),
        ({"noise_mse": 0.1, "vae_psnr": 30.0}, "noise_mse", "minimize"),
    ],
)
def test_auto_gate_follows_the_data(metrics, metric, direction):
    gate = choose_gate(RegisterParams(), metrics)
    assert (gate.metric, gate.direction) == (metric, direction)
    assert gate.rule.startswith("auto")


def test_an_explicit_gate_metric_keeps_working_and_knows_its_direction():
    assert choose_gate(RegisterParams(gate_metric="vae_psnr"), {}).direction == "maximize"
    assert choose_gate(RegisterParams(gate_metric="noise_mse_t100"), {}).direction == "minimize"
    assert choose_gate(RegisterParams(gate_metric="fid", gate_direction="maximize"), {}).direction == "maximize"
    with pytest.raises(ValueError, match="gate_direction: must be auto when register.gate_metric is auto"):
        RegisterParams(gate_direction="maximize")


def test_label_adherence_from_a_weak_classifier_is_not_trusted():
    gate, settings = choose_gate(RegisterParams(), {"label_adherence": 1.0}), RegisterParams()
    assert untrusted_reason(gate, {"label_adherence": 1.0, "classifier_accuracy": 0.8}, {}, settings) is None
    weak = untrusted_reason(gate, {"label_adherence": 1.0, "classifier_accuracy": 0.5}, {}, settings)
    assert "reads 50.0% of the real validation images right, below register.min_classifier_accuracy=0.8" in weak
    missing = {"classifier_accuracy": "no validation image carries one of the labels"}
    assert "no validation image" in untrusted_reason(gate, {"label_adherence": 1.0}, missing, settings)


@pytest.mark.parametrize(
    ("new", "champion", "direction", "margin", "expected"),
    [
        (0.5, None, "maximize", 0.0, True),
        (0.6, 0.5, "maximize", 0.0, True),
        (0.5, 0.5, "maximize", 0.0, False),
        (0.55, 0.5, "maximize", 0.1, False),
        (0.4, 0.5, "minimize", 0.0, True),
        (0.6, 0.5, "minimize", 0.0, False),
    ],
)
def test_gate(new, champion, direction, margin, expected):
    assert gate_passes(new, champion, direction, margin) is expected


def test_promote_and_rollback_move_champion_and_record_why(project_copy, capsys):
    from pipeline.cli import main
    from pipeline.tracking.champion import list_versions, promote, rollback

    params, paths = project_copy
    metrics = json.loads((paths.metrics / "eval.json").read_text())
    register(params, paths)
    _retrain(paths, adherence=metrics["adherence"] - 0.1)
    register(params, paths)
    client = _client(params, paths)
    name = params.register_.model_name

    assert promote(params, paths, 2, reason="looks better by eye", by="reviewer") == 1
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert champion.version == 2
    assert (champion.tags["promoted_by"], champion.tags["promoted_reason"]) == ("reviewer", "looks better by eye")
    assert [(v["version"], v["aliases"]) for v in list_versions(params, paths)] == [
        (2, [CHALLENGER, CHAMPION]), (1, [])
    ]

    assert rollback(params, paths, reason="artefacts", by="reviewer") == 1
    assert client.get_model_version_by_alias(name, CHAMPION).version == 1
    with pytest.raises(LookupError, match="nothing to roll back to"):
        rollback(params, paths, reason="again", by="reviewer")
    with pytest.raises(LookupError, match="no version 7"):
        promote(params, paths, 7, reason="typo", by="reviewer")

    (paths.root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    assert main(["--params", str(paths.root / "params.yaml"), "promote", "7"]) == 1
    assert "sdpipe promote: error: sdpipe has no version 7" in capsys.readouterr().err
    assert main(["--params", str(paths.root / "params.yaml"), "models"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:2] == ["2", CHALLENGER] and listing[1].split()[:2] == ["1", CHAMPION]
