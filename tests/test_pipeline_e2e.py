"""The real thing: `dvc repro` of dvc.yaml on tiny params in a temporary copy of the repository."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline

from pipeline.core.params_file import read_params_file

from .conftest import REPO, free_port, only_inputs_changed, tiny_params_dict, tree_hashes

STAGES = ["inputs", "class_images", "ingest", "validate", "preprocess", "vae", "encode", "train", "evaluate", "register"]


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


@pytest.fixture(scope="module")
def prefect_harness():
    """Prefect's test harness (a temporary server) for the module's in-process flow runs: one start, not one
    per test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


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
    assert stages_run(again.stdout) == {"inputs"}, again.stdout  # it always runs; its fingerprints did not change


@pytest.mark.e2e
def test_data_stages_without_ray_write_what_they_write_on_ray(repo_copy, trained_project):
    """dvc repro's stages have fewer tasks than ray.min_tasks here and run them in their own processes; the
    session fixture's stages ran theirs on Ray. Same params: the same bytes."""
    _, on_ray = trained_project
    for folder in ("raw", "validated", "processed", "latents"):
        assert tree_hashes(repo_copy / "data" / folder) == tree_hashes(on_ray.root / "data" / folder), folder


@pytest.mark.e2e
def test_importing_the_code_with_bytecode_on_leaves_dvc_status_up_to_date(repo_copy):
    """Python writes __pycache__/ into pipeline/ on import by default; DVC must not see a changed dep."""
    modules = [".".join(path.relative_to(repo_copy).with_suffix("").parts).removesuffix(".__init__")
               for folder in ("pipeline", "flows") for path in sorted((repo_copy / folder).rglob("*.py"))]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(repo_copy)  # the copy's own modules, so their bytecode lands in the copy
    for command in ([sys.executable, "-c", "; ".join(f"import {module}" for module in modules)],
                    [sys.executable, "-m", "pipeline.cli", "--help"]):
        done = subprocess.run(command, cwd=repo_copy, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert any((repo_copy / "pipeline" / "data" / "sources" / "__pycache__").glob("*.pyc")), "no bytecode was written"
    status = _run(["dvc", "status"], repo_copy).stdout
    assert only_inputs_changed(status), status


def _tracked_state(root: Path) -> tuple[str, str, str]:
    """git status of the tracked files, params.yaml and dvc.lock (not committed in the copy) as they are."""
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], root).stdout
    return status, (root / "params.yaml").read_text(), (root / "dvc.lock").read_text()


def _experiment(root: Path, name: str) -> dict:
    """The experiment's row of `dvc exp show --json`: its params and metrics."""
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root).stdout)
    rows = [rev["data"] for baseline in shown for exp in baseline.get("experiments") or []
            for rev in exp["revs"] if rev.get("name") == name]
    assert rows, f"no experiment {name!r} in dvc exp show"
    return rows[0]


@pytest.mark.e2e
def test_prefect_flow_with_a_change_is_a_dvc_experiment_that_leaves_the_project_alone(repo_copy, prefect_harness,
                                                                                       monkeypatch):
    """A train setting changed: DVC re-runs train and what reads its outputs, never the data stages, vae or
    encode; as an experiment, beside the project."""
    from flows.experiments import experiment_ref, read_json_at
    from flows.training import training_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before, registry = _tracked_state(repo_copy), repo_copy / "metrics" / "registry.json"
    record_before = registry.read_text()
    learning_rate = read_params_file(repo_copy / "params.yaml")["train"]["learning_rate"] * 2
    timesteps = read_params_file(repo_copy / "params.yaml")["evaluate"]["timesteps"]
    outcomes = training_flow(project_root=str(repo_copy), learning_rate=learning_rate,
                             overrides={"evaluate.timesteps": timesteps + [500]}, experiment="faster-lr")
    summary = _artifact("training-summary")
    assert list(outcomes) == STAGES
    assert {stage for stage, outcome in outcomes.items() if outcome == "ran"} == {"inputs", "train", "evaluate",
                                                                                 "register"}
    assert _tracked_state(repo_copy) == before, "params.yaml, dvc.lock and git's tracked files are untouched"
    assert registry.read_text() == record_before, "the workspace's outputs are untouched"

    experiment = _experiment(repo_copy, "faster-lr")
    assert experiment["params"]["params.yaml"]["data"]["train"]["learning_rate"] == learning_rate
    assert experiment["params"]["params.yaml"]["data"]["train"]["mixed_precision"] == "no"
    assert "noise_mse_t500" in experiment["metrics"]["metrics/eval.json"]["data"]
    registered = read_json_at(repo_copy, experiment_ref(repo_copy, "faster-lr"), "metrics/registry.json")
    assert not registered["reused_existing_version"]

    client = mlflow.MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    version = client.get_model_version("sdpipe", str(registered["version"]))
    assert version.tags["dvc_experiment"] == "faster-lr"
    run = client.get_run(version.run_id)
    assert run.data.tags["dvc_experiment"] == "faster-lr" and float(run.data.params["train.learning_rate"]) == learning_rate
    assert "**faster-lr**" in summary and "train.learning_rate" in summary and "| adherence |" in summary


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no Prefect artifact {key!r}"
    return found[0].data


def _api(method: str, url: str, **request):
    """A Prefect API call, retried while the server answers 503 as Prefect's own client retries it (the server's
    word for a retryable error, such as its SQLite database busy on a loaded machine)."""
    for _ in range(10):
        response = httpx.request(method, url, timeout=30, **request)
        if response.status_code != 503:
            return response.json()
        time.sleep(2)
    response.raise_for_status()


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
            found = _api("POST", f"{api}/deployments/filter", json={"deployments": {"name": {"any_": [name]}}})
            return found[0] if found else None

        train = _wait_for(lambda: deployment("train"), 120, f"the deployments (log: {tmp_path / 'serve.log'})")
        retrain = _wait_for(lambda: deployment("retrain"), 30, "the retrain deployment")
        assert retrain["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

        # a register setting: the experiment re-runs register only (training through a flow is tested above)
        gate = read_params_file(repo_copy / "params.yaml")["register"]["min_improvement"] + 0.5
        before = _tracked_state(repo_copy)
        run = _api("POST", f"{api}/deployments/{train['id']}/create_flow_run",
                   json={"parameters": {"overrides": {"register.min_improvement": gate}}})
        assert "id" in run, run

        def finished():
            state = _api("GET", f"{api}/flow_runs/{run['id']}")["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait_for(finished, 420, f"the train flow run (log: {tmp_path / 'serve.log'})", interval=3)
        assert state["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        task_runs = _api("POST", f"{api}/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [run["id"]]}}})
        assert sorted(task["name"] for task in task_runs) == sorted(STAGES)
        assert _tracked_state(repo_copy) == before
        experiment = _experiment(repo_copy, run["name"])
        assert experiment["params"]["params.yaml"]["data"]["register"]["min_improvement"] == gate
        assert "adherence" in experiment["metrics"]["metrics/eval.json"]["data"]
    finally:
        served.terminate()
        served.wait(timeout=60)


@pytest.mark.e2e
def test_retrain_flow_ignores_an_unshifted_batch_and_retrains_on_a_shifted_one(repo_copy, prefect_harness, monkeypatch):
    from flows.retrain import retrain_flow
    from pipeline.contracts.paths import Paths
    from pipeline.core.params_file import load_params
    from pipeline.monitor import drop_demo_batch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params, paths = load_params(repo_copy / "params.yaml"), Paths(repo_copy)
    versions_before = json.loads((repo_copy / "metrics" / "registry.json").read_text())["version"]
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
