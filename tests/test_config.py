import pytest

from pipeline.config import ConfigError, load_params, parse_params

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


def test_overrides_keep_comments_and_bad_ones_leave_the_file_alone(tmp_path):
    from pipeline.config import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    params = apply_overrides(path, {"train.steps": 7, "train.learning_rate": 0.01})
    assert params.train.steps == 7 and params.train.learning_rate == 0.01
    text = path.read_text()
    assert "# share of empty captions" in text and "steps: 7" in text
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        apply_overrides(path, {"train.stepz": 1})
    with pytest.raises(ConfigError, match="'nosuch' is not a section"):
        apply_overrides(path, {"nosuch.key": 1})
    assert path.read_text() == text
