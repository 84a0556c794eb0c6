"""The real thing: `dvc repro` of dvc.yaml on tiny params in a temporary copy of the repository."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import mlflow
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline

from .conftest import REPO, free_port, merge, save_random_base_model, tiny_params_dict

STAGES = ["ingest", "validate", "preprocess", "vae", "encode", "train", "evaluate", "register"]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # set in this process by other tests' mlflow.set_tracking_uri
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_repository(root: Path, params: dict) -> Path:
    """The tracked files of this repository (as a fresh clone has them) with the given params, committed."""
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        _run(command, root)
    return root


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    return copy_repository(tmp_path_factory.mktemp("clone"), tiny_params_dict())


def stages_run(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


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
    assert stages_run(out) == {"train", "evaluate", "register"}, out


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
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no Prefect artifact {key!r}"
    return found[0].data


def _wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def prefect_server(tmp_path):
    """A real `prefect server start` on loopback, in its own PREFECT_HOME; yields its API URL."""
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    port = api.split(":")[2].split("/")[0]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", port], env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy():
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_for(healthy, 120, f"the Prefect server (log: {tmp_path / 'server.log'})")
        yield api, env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.e2e
def test_deployments_on_a_real_prefect_server_run_train_with_an_override(repo_copy, prefect_server, tmp_path):
    api, env = prefect_server
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "serve.log").open("w")
    served = subprocess.Popen([sys.executable, "-m", "flows.deploy"], cwd=repo_copy, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        def deployment(name):
            found = httpx.post(f"{api}/deployments/filter",
                               json={"deployments": {"name": {"any_": [name]}}}).json()
            return found[0] if found else None

        train = _wait_for(lambda: deployment("train"), 120, f"the deployments (log: {tmp_path / 'serve.log'})")
        retrain = _wait_for(lambda: deployment("retrain"), 30, "the retrain deployment")
        assert retrain["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

        steps = yaml.safe_load((repo_copy / "params.yaml").read_text())["train"]["steps"] + 2
        run = httpx.post(f"{api}/deployments/{train['id']}/create_flow_run",
                         json={"parameters": {"steps": steps}}).json()

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run['id']}").json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait_for(finished, 420, f"the train flow run (log: {tmp_path / 'serve.log'})", interval=3)
        assert state["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        task_runs = httpx.post(f"{api}/task_runs/filter",
                               json={"task_runs": {"flow_run_id": {"any_": [run["id"]]}}}).json()
        assert sorted(task["name"] for task in task_runs) == sorted(STAGES)
        assert yaml.safe_load((repo_copy / "params.yaml").read_text())["train"]["steps"] == steps
        registry = json.loads((repo_copy / "metrics" / "registry.json").read_text())
        assert not registry["reused_existing_version"], "a retrained model is a new registry version"
    finally:
        served.terminate()
        served.wait(timeout=60)


@pytest.mark.e2e
def test_retrain_flow_ignores_an_unshifted_batch_and_retrains_on_a_shifted_one(repo_copy, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import retrain_flow
    from pipeline.config import load_params
    from pipeline.contracts.paths import Paths
    from pipeline.monitor import drop_demo_batch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params, paths = load_params(repo_copy / "params.yaml"), Paths(repo_copy)
    versions_before = json.loads((repo_copy / "metrics" / "registry.json").read_text())["version"]
    with prefect_test_harness(server_startup_timeout=90):
        drop_demo_batch(params, paths, shift="none", count=120, seed=11)
        quiet = retrain_flow(project_root=str(repo_copy))
        assert not quiet["retrain"] and "no drift" in quiet["reasons"][-1], quiet["reasons"]
        assert "no retraining" in _artifact("retraining-decision")

        drop_demo_batch(params, paths, shift="background", count=120, seed=12)
        shifted = retrain_flow(project_root=str(repo_copy))
        decision = _artifact("retraining-decision")
    assert shifted["retrain"], shifted["reasons"]
    assert any("brightness" in reason for reason in shifted["reasons"]) and "brightness" in decision
    assert shifted["merged_samples"] == 240 and shifted["stages"]["ingest"] == "ran"
    assert shifted["stages"]["train"] == "ran"
    registry = json.loads((repo_copy / "metrics" / "registry.json").read_text())
    assert registry["version"] > versions_before
    history = (repo_copy / "data" / "monitoring" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["decision"]["retrain"] for line in history] == [False, True]


@pytest.mark.e2e
def test_dvc_repro_finetunes_with_lora_and_encodes_only_what_changed(tmp_path):
    params = merge(tiny_params_dict(), {"model": {"mode": "finetune", "pretrained": "models/base"},
                                        "train": {"steps": 10, "sample_every": 0}})
    root = copy_repository(tmp_path / "clone", params)
    save_random_base_model(root / "models" / "base")
    _run(["dvc", "repro", "train"], root)
    assert (root / "models" / "sd" / "pytorch_lora_weights.safetensors").is_file()
    samples = len(pd.read_parquet(root / "data" / "validated" / "manifest.parquet"))

    params["train"]["random_flip"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = _run(["dvc", "repro", "train"], root)
    assert stages_run(again.stdout) == {"encode", "train"}, again.stdout
    assert f"latents {samples} encoded, {samples} reused" in again.stderr, "only the mirrored images are new"
