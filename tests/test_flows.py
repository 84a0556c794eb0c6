"""The flows orchestrate and nothing else: light imports, a usable custom-run form, experiments from overrides."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO

HEAVY = ("torch", "diffusers", "transformers")


def test_importing_the_flows_loads_no_ml_library():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, json, flows.training, flows.retrain, flows.deploy; "
                               f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert json.loads(loaded.stdout.splitlines()[-1]) == []


def test_the_custom_run_form_describes_every_parameter_and_starts_at_params_yaml():
    from flows.deploy import deployments
    from flows.training import PARAMETER_KEYS
    from pipeline.core.params_file import load_params

    train = next(d for d in deployments(REPO) if d.name == "train")
    schema = train._parameter_openapi_schema.model_dump()["properties"]
    assert all(field.get("description") for field in schema.values()), schema
    assert schema["source"]["enum"] == ["synthetic", "folder", "manifest", "hf", "webdataset"]
    assert schema["mode"]["enum"] == ["scratch", "finetune"] and schema["finetune"]["enum"] == ["full", "lora"]
    params = load_params(REPO / "params.yaml")
    assert schema["steps"] == {**schema["steps"], "type": "integer", "default": params.train.steps}
    assert schema["learning_rate"]["default"] == params.train.learning_rate
    assert schema["mode"]["default"] == params.model.mode and "anyOf" not in schema["mode"]
    assert set(PARAMETER_KEYS) <= set(schema)


def test_typed_parameters_equal_to_params_yaml_are_no_change():
    from flows.training import flow_overrides
    from pipeline.core.params_file import load_params

    params = load_params(REPO / "params.yaml")
    typed = dict(steps=params.train.steps, learning_rate=None, mode=params.model.mode, batch_size=7)
    assert flow_overrides(REPO, typed, {"evaluate.guidance_scale": 5}) == {
        "evaluate.guidance_scale": 5, "train.batch_size": 7}


def test_overrides_become_set_param_arguments_down_to_the_leaves():
    from flows.experiments import set_param_args

    assert set_param_args({"train.mixed_precision": "no", "evaluate.timesteps": [100, 900],
                           "validate.max_empty_caption_share": {"folder": 0.3}, "train.snr_gamma": None}) == [
        "--set-param", '++train.mixed_precision="no"', "--set-param", "++evaluate.timesteps=[100, 900]",
        "--set-param", "++validate.max_empty_caption_share.folder=0.3", "--set-param", "++train.snr_gamma=null"]


def test_the_experiment_copy_gets_what_dvc_and_git_do_not_hold(tmp_path):
    from flows.experiments import copy_paths

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  a:\n    cmd: x\n    deps: [data/batches, code.py]\n    outs:\n      - data/raw:\n"
        "          persist: true\n      - run.json:\n          cache: false\n    metrics:\n"
        "      - metrics/a.json:\n          cache: false\n  b:\n    cmd: y\n    deps: [data/raw]\n"
    )
    for path in ("code.py", "data/batches/.gitkeep"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    for path in ("dvc.lock", "data/batches/x/1.png", "data/raw/1.png", "run.json", "metrics/a.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    assert sorted(copy_paths(tmp_path)) == ["data/batches/x", "dvc.lock", "metrics", "run.json"]


def _stage_output(lines: list[str], exit_code: int = 0):
    from flows.experiments import StageOutput

    script = "import sys; print(sys.argv[1], end=''); sys.exit(int(sys.argv[2]))"
    return StageOutput(subprocess.Popen([sys.executable, "-c", script, "".join(f"{line}\n" for line in lines),
                                         str(exit_code)], stdout=subprocess.PIPE, text=True))


def test_one_experiments_output_is_cut_into_its_stages():
    output = _stage_output(["Reproducing experiment 'e1'", "Stage 'ingest' didn't change, skipping",
                            "Running stage 'train':", "> sdpipe train", "loss 0.1", "Ran experiment(s): e1"])
    assert [line.rstrip() for line in output.of_stage("ingest", last=False)] == [
        "Reproducing experiment 'e1'", "Stage 'ingest' didn't change, skipping"]
    assert not output.ended
    assert [line.rstrip() for line in output.of_stage("train", last=True)] == [
        "Running stage 'train':", "> sdpipe train", "loss 0.1", "Ran experiment(s): e1"]
    assert output.ended and output.process.wait() == 0


def test_a_stage_out_of_order_is_an_error():
    output = _stage_output(["Running stage 'train':"])
    with pytest.raises(RuntimeError, match="reached stage 'train' where 'ingest' was expected"):
        list(output.of_stage("ingest", last=False))
    output.process.wait()
