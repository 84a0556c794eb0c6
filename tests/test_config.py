import pytest

from pipeline.core.config import ConfigError
from pipeline.core.params_file import load_params, parse_params

from .conftest import REPO


def test_project_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.ingest.source == "synthetic"
    assert params.register_.model_name == "sdpipe"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.lerning_rate: unknown key"):
        parse_params({"train": {"lerning_rate": 0.1}})


def test_wrong_type_is_named_with_value():
    with pytest.raises(ConfigError, match=r"train\.steps: .*integer.*'many'"):
        parse_params({"train": {"steps": "many"}})


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        parse_params({"trian": {}})


def test_resolution_must_suit_the_vae():
    with pytest.raises(ConfigError, match=r"preprocess\.resolution: .*multiple of 8"):
        parse_params({"preprocess": {"resolution": 30}})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_params(tmp_path / "params.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(path)


def test_overrides_are_checked_without_writing_the_file(tmp_path):
    from pipeline.core.params_file import with_overrides

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    text = path.read_text()
    params = with_overrides(path, {"train.steps": 7, "train.learning_rate": 0.01})
    assert params.train.steps == 7 and params.train.learning_rate == 0.01
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        with_overrides(path, {"train.stepz": 1})
    with pytest.raises(ConfigError, match="'nosuch' is not a section"):
        with_overrides(path, {"nosuch.key": 1})
    assert path.read_text() == text


def _leaves(mapping: dict, prefix: str = "") -> dict:
    leaves = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_every_key_survives_dvcs_params_writer(tmp_path):
    """`dvc exp run -S KEY=VALUE` rewrites params.yaml with DVC's own writer (dvc.utils.hydra.apply_overrides,
    which drops the quotes of `mixed_precision: "no"`): setting each key to its value must give the same Params."""
    from dvc.utils.hydra import apply_overrides

    from flows.experiments import hydra_value
    from pipeline.core.params_file import read_params_file

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    expected = load_params(path)
    leaves = _leaves(read_params_file(path))
    assert len(leaves) > 100 and "train.mixed_precision" in leaves
    for key, value in leaves.items():
        apply_overrides(path, [f"{key}={hydra_value(value)}"])
        assert load_params(path) == expected, f"{key}={hydra_value(value)} changed the params"
    assert 'mixed_precision: "no"' not in path.read_text(), "DVC's writer no longer drops the quotes"
