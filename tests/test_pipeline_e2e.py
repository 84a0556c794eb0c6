"""The real thing: `dvc repro` of dvc.yaml on tiny params in a temporary copy of the repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline

from .conftest import REPO, tiny_params_dict

STAGES = ["ingest", "validate", "preprocess", "vae", "encode", "train", "evaluate", "register"]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # set in this process by other tests' mlflow.set_tracking_uri
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """The tracked files of this repository (as a fresh clone has them) with tiny params, committed."""
    root = tmp_path_factory.mktemp("clone")
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        _run(command, root)
    return root


@pytest.mark.e2e
def test_dvc_repro_trains_registers_and_then_does_nothing(repo_copy):
    _run(["dvc", "repro"], repo_copy)

    assert [stage for stage in yaml.safe_load((repo_copy / "dvc.yaml").read_text())["stages"]] == STAGES
    shown = _run(["dvc", "metrics", "show"], repo_copy).stdout
    assert "noise_mse" in shown and "adherence" in shown

    mlflow.set_tracking_uri(f"sqlite:///{repo_copy / 'mlflow.db'}")
    champion = mlflow.MlflowClient().get_model_version_by_alias("sdpipe", "champion")
    assert champion.version == 1
    assert champion.tags["data_version"] != "unknown", "the data version comes from dvc.lock"

    pipeline = StableDiffusionPipeline.from_pretrained(repo_copy / "models" / "sd")
    image = pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    again = _run(["dvc", "repro"], repo_copy)
    assert "Running stage" not in again.stdout, again.stdout


@pytest.mark.e2e
def test_changing_a_train_param_reruns_only_what_depends_on_it(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["steps"] += 1
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo_copy).stdout
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in out}
    assert ran == {"train", "evaluate", "register"}, out


@pytest.mark.e2e
def test_prefect_flow_runs_each_stage_as_a_task_and_dvc_skips_what_is_fresh(repo_copy, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.training import training_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry = repo_copy / "metrics" / "registry.json"
    version_before = json.loads(registry.read_text())["version"]
    timesteps = yaml.safe_load((repo_copy / "params.yaml").read_text())["evaluate"]["timesteps"]
    with prefect_test_harness(server_startup_timeout=90):
        # new noise metrics: eval.json changes, so register runs
        outcomes = training_flow(project_root=str(repo_copy), overrides={"evaluate.timesteps": timesteps + [500]})
        summary = _artifact("training-summary")
    assert list(outcomes) == STAGES
    assert {stage for stage, outcome in outcomes.items() if outcome == "ran"} == {"evaluate", "register"}
    assert json.loads(registry.read_text())["version"] == version_before, "same model files: no new version"
    assert yaml.safe_load((repo_copy / "params.yaml").read_text())["evaluate"]["timesteps"] == timesteps + [500]
    assert "evaluate.timesteps" in summary and f"version {version_before}" in summary and "| adherence |" in summary


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no Prefect artifact {key!r}"
    return found[0].data
