"""The error policy of `sdpipe`: what a user can fix is one sentence, a bug keeps its traceback."""

import json

import pytest
import yaml

from pipeline.cli import DEBUG_ENV, main
from pipeline.core.config import ConfigError
from pipeline.core.errors import UserError
from pipeline.data.sources import SourceError
from pipeline.stages.validate import ValidationFailed

from .conftest import tiny_params_dict


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    return ["--params", str(params)]


def test_sdpipes_own_errors_are_user_errors_and_keep_their_builtin_kind():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    assert issubclass(SourceError, UserError) and issubclass(ValidationFailed, UserError)


def test_a_user_error_is_one_sentence_and_debug_shows_its_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    broken = tmp_path / "params.yaml"
    broken.write_text("train: {steps: -1}\n")
    assert main(["--params", str(broken), "train"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("sdpipe train: error: ") and "train.steps" in error and "Traceback" not in error
    with pytest.raises(ConfigError, match="train.steps"):
        main(["--params", str(broken), "--debug", "train"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="train.steps"):
        main(["--params", str(broken), "train"])


def test_a_bug_keeps_its_traceback(project, tmp_path):
    """A KeyError inside the code (here a report that lacks a field decide reads) is not a user's sentence."""
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"batch": "b", "samples": 10, "valid": 10, "validation": {},
                                  "drifted_features": ["brightness"], "features": {"brightness": {}}}))
    with pytest.raises(KeyError, match="psi"):
        main([*project, "decide", str(report), "--out", str(tmp_path / "decision.json")])


@pytest.mark.parametrize("option", ["-n", "--batch-size", "--steps"])
def test_generate_refuses_a_count_below_one_before_any_work(project, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*project, "generate", "--prompt", "a red circle", option, "0"])
    assert exit_.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err
