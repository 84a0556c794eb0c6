"""Team mode against the real servers of `sdpipe services` (one stack for the session, tests/conftest.py)."""

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import boto3
import pytest
from botocore.exceptions import ClientError

from pipeline import services
from pipeline.contracts.paths import Paths
from pipeline.core import team
from pipeline.training.checkpoints import checkpoint_folders

from .conftest import free_port, only_inputs_changed, tree_hashes

pytestmark = pytest.mark.team


def _status_code(url: str, login: str | None = None) -> int:
    headers = {"Authorization": "Basic " + b64encode(login.encode()).decode()} if login else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as refused:
        return refused.code


def test_the_stack_runs_and_answers_only_its_logins(team_stack):
    settings = team.read_team_settings(team_stack.root)
    assert all(line.startswith("running") for line in services.status(team_stack.root, team_stack.state).values())

    experiments = settings[team.TRACKING_URI] + "/api/2.0/mlflow/experiments/search?max_results=1"
    login = f"{settings[team.TRACKING_USERNAME]}:{settings[team.TRACKING_PASSWORD]}"
    assert (_status_code(experiments), _status_code(experiments, "admin:wrong-password")) == (401, 401)
    assert _status_code(experiments, login) == 200

    version = settings[team.PREFECT_API_URL] + "/admin/version"
    assert (_status_code(version), _status_code(version, settings[team.PREFECT_AUTH])) == (401, 200)

    s3 = boto3.client("s3", endpoint_url=settings[team.DVC_ENDPOINT], region_name="us-east-1",
                      aws_access_key_id=settings[team.DVC_KEY_ID], aws_secret_access_key="wrong")
    with pytest.raises(ClientError):
        s3.list_objects_v2(Bucket=services.DVC_BUCKET)

    for private in (team.team_file(team_stack.root), team_stack.record_file):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600, private
    # clients get their logins, never the database password
    assert team_stack.secret["postgres"] not in team.team_file(team_stack.root).read_text()


# --- the pipeline through the work pool --------------------------------------------------------------------

TRIGGER = ("import json, sys; from prefect.deployments import run_deployment; "
           "[print(run_deployment('sdpipe-train/train', parameters=p, timeout=0).id) for p in json.loads(sys.argv[1])]")
RUN_SECONDS = 1500
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# the custom run triggered beside the re-run: it trains (a change makes it a DVC experiment), so it has its
# own MLflow run, and registers its own model, so the project's versions stay those the tests below count
EXPERIMENT_MODEL = "sdpipe-experiment"
EXPERIMENT_RUN = {"steps": 2, "overrides": {"register.model_name": EXPERIMENT_MODEL}}


def _env(stack, **extra: str) -> dict[str, str]:
    """A client's environment: team.env's settings, this venv's scripts first, quick MLflow retries."""
    return {**os.environ, **team.read_team_settings(stack.root), "PREFECT_HOME": str(stack.state / "prefect-client"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", **extra}


def _run(command: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert not check or result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result


def _trigger(stack, *parameter_sets: dict) -> list[str]:
    """One flow run of the train deployment per parameter set, all created at once; their ids."""
    created = _run([sys.executable, "-c", TRIGGER, json.dumps(parameter_sets)], stack.root, _env(stack))
    return created.stdout.split()[-len(parameter_sets):]


def _flow_run(stack, flow_run_id: str) -> dict:
    return _prefect_api(stack, f"flow_runs/{flow_run_id}")


def _wait_for_final_state(stack, flow_run_id: str, seconds: float = RUN_SECONDS) -> dict:
    deadline = time.monotonic() + seconds
    while (run := _flow_run(stack, flow_run_id))["state_type"] not in FINAL_STATES:
        assert time.monotonic() < deadline, f"flow run {flow_run_id} is still {run['state_type']} after {seconds} s"
        time.sleep(1)
    return run


def _wait_for_a_checkpoint(stack, flow_run_id: str) -> None:
    paths, deadline, next_look = Paths(stack.root), time.monotonic() + RUN_SECONDS, 0.0
    while not checkpoint_folders(paths):
        if time.monotonic() > next_look:  # the server only now and then: the checkpoint is polled often
            state = _flow_run(stack, flow_run_id)["state_type"]
            assert state in ("SCHEDULED", "PENDING", "RUNNING"), f"the run ended ({state}) before a checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint after {RUN_SECONDS} s"
            next_look = time.monotonic() + 10
        time.sleep(0.1)


def _process_tree(pid: int) -> list[int]:
    """pid and every process under it, parents first (read from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    tree = [pid]
    for parent in tree:  # grows while it is walked: breadth first
        tree += [child for child, of in parents.items() if of == parent]
    return tree


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_the_worker_and_its_flow_run(stack) -> None:
    """SIGKILL the worker and every process under it (the flow run, its `dvc repro`, the stage), by pid, as a
    dying machine would; then wait until all are gone."""
    tree = _process_tree(services.Stack(stack.root, stack.state).record["pids"]["worker"]["pid"])
    assert len(tree) > 2, f"the worker runs no flow run: {tree}"
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):  # one that ended since the tree was read
            os.kill(pid, signal.SIGKILL)
    services.stop(stack.root, stack.state, only=("worker",))  # waits for the worker, which this process started
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in tree):
        assert time.monotonic() < deadline, [pid for pid in tree if _alive(pid)]
        time.sleep(0.2)


class PoolRuns(NamedTuple):
    killed: dict  # flow runs as the Prefect server records them
    rerun: dict
    experiment_id: str  # still queued or running: the `all_runs` fixture waits for it
    killed_before_export: bool


@pytest.fixture(scope="module")
def pool_run(team_stack) -> PoolRuns:
    """`make deploy`'s command in team mode (deployments onto the work pool), then runs of the train
    deployment, which the stack's worker picks up. The first is killed with its worker once training has
    written a checkpoint; a re-run and a custom run (an experiment) are triggered at once and a new worker
    started. Once the server marks the killed run crashed, the re-run resumes its training: the tiny
    pipeline, registered on the server, pushed. The tests of its champion run while the experiment does."""
    _run([sys.executable, "-m", "flows.deploy"], team_stack.root, _env(team_stack))
    (killed,) = _trigger(team_stack, {})
    _wait_for_a_checkpoint(team_stack, killed)
    _kill_the_worker_and_its_flow_run(team_stack)
    killed_before_export = not Paths(team_stack.root).sd_model.exists()
    rerun, experiment = _trigger(team_stack, {}, EXPERIMENT_RUN)
    services.start(team_stack.root, team_stack.state, only=("worker",), ui=False, worker_poll=1, fast=True)
    crashed = _wait_for_final_state(team_stack, killed, seconds=300)
    return PoolRuns(crashed, _wait_for_final_state(team_stack, rerun), experiment, killed_before_export)


@pytest.fixture(scope="module")
def all_runs(team_stack, pool_run) -> dict:
    """The experiment's flow run, finished: no run is left in the project (tests that stop a server or copy
    the project wait for this)."""
    return _wait_for_final_state(team_stack, pool_run.experiment_id)


@pytest.fixture
def admin(team_stack, monkeypatch):
    """An MLflow client logged in as team.env's login."""
    from mlflow import MlflowClient

    settings = team.read_team_settings(team_stack.root)
    for key in (team.TRACKING_USERNAME, team.TRACKING_PASSWORD):
        monkeypatch.setenv(key, settings[key])
    return MlflowClient(tracking_uri=settings[team.TRACKING_URI])


def _bucket_keys(stack, bucket: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1",
                      aws_access_key_id=stack.secret["s3_key"], aws_secret_access_key=stack.secret["s3_secret"])
    return [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for item in page.get("Contents", [])]


def test_a_pool_run_registers_the_champion_with_its_artifacts_in_the_bucket(team_stack, pool_run, admin):
    from flows import publish

    assert pool_run.rerun["state_type"] == "COMPLETED"
    champion = admin.get_model_version_by_alias("sdpipe", "champion")
    assert champion.version == "1"
    keys = _bucket_keys(team_stack, services.MLFLOW_BUCKET)
    assert any(key.endswith("/MLmodel") for key in keys), keys
    assert any(key.endswith("unet/diffusion_pytorch_model.safetensors") for key in keys), keys
    assert not (team_stack.root / "mlartifacts").exists() and not (team_stack.root / "mlflow.db").exists()
    head = _run(["git", "rev-parse", "HEAD"], team_stack.root, os.environ).stdout.strip()
    assert champion.tags[publish.COMMIT_TAG] == head
    assert champion.tags[publish.REMOTE_TAG] == team.read_team_settings(team_stack.root)[team.DVC_REMOTE]
    assert champion.tags[publish.MODEL_MD5_TAG].endswith(".dir")
    assert champion.tags["prefect_flow_run_id"] == pool_run.rerun["id"]


def _prefect_api(stack, path: str, query: dict | None = None):
    """GET (or with a query, POST) one of the Prefect server's REST endpoints with team.env's auth."""
    settings = team.read_team_settings(stack.root)
    request = urllib.request.Request(
        f"{settings[team.PREFECT_API_URL]}/{path}", data=json.dumps(query).encode() if query else None, headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + b64encode(settings[team.PREFECT_AUTH].encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def _prefect_records(stack, kind: str, flow_run_id: str) -> list[dict]:
    return _prefect_api(stack, f"{kind}/filter", {kind: {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})


def test_the_deployments_sit_on_the_work_pool_with_the_custom_run_form(team_stack, pool_run):
    from pipeline.core.params_file import load_params

    train = _prefect_api(team_stack, "deployments/name/sdpipe-train/train")
    assert train["work_pool_name"] == services.POOL
    steps = train["parameter_openapi_schema"]["properties"]["steps"]
    assert steps["default"] == load_params(team_stack.root / "params.yaml").train.steps and steps["description"]
    assert _prefect_api(team_stack, f"work_pools/{services.POOL}")["concurrency_limit"] == 1


def _time(moment: str) -> datetime:
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


def test_a_worker_killed_mid_training_crashes_its_run_and_the_rerun_resumes(team_stack, pool_run, admin):
    assert pool_run.killed_before_export, "the first run finished training before it was killed"
    assert pool_run.killed["state_type"] == "CRASHED", pool_run.killed["state"]
    assert "no heartbeat" in pool_run.killed["state"]["message"]
    assert pool_run.rerun["state_type"] == "COMPLETED"
    paths = Paths(team_stack.root)
    trained = json.loads((paths.metrics / "train.json").read_text())
    assert 0 < trained["resumed_from_step"] < trained["steps"]
    assert not checkpoint_folders(paths), "a finished training keeps no checkpoint"
    # the killed run's MLflow run, continued to the end by the re-run
    run = admin.get_run(admin.get_model_version_by_alias("sdpipe", "champion").run_id)
    assert run.data.tags["prefect_flow_run_id"] == pool_run.killed["id"] and run.info.status == "FINISHED"
    assert run.data.metrics["train_resumed_from_step"] == trained["resumed_from_step"]


def test_the_run_summary_links_the_run_on_the_mlflow_server(team_stack, pool_run, admin):
    artifacts = _prefect_records(team_stack, "artifacts", pool_run.rerun["id"])
    summary = next(artifact["data"] for artifact in artifacts if artifact["key"] == "training-summary")
    run = admin.get_run(admin.get_model_version_by_alias("sdpipe", "champion").run_id)
    uri = team.read_team_settings(team_stack.root)[team.TRACKING_URI]
    assert f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in summary
    assert "make ui-mlflow" not in summary and "sqlite" not in summary


def test_a_colleague_pulls_the_champion_byte_for_byte_and_nothing_is_stale(team_stack, pool_run, admin,
                                                                            tmp_path):
    champion = admin.get_model_version_by_alias("sdpipe", "champion")
    clone = tmp_path / "colleague"
    _run(["git", "clone", "-q", str(team_stack.root), str(clone)], tmp_path, os.environ)
    _run(["git", "checkout", "-q", champion.tags["dvc.commit"]], clone, os.environ)
    shutil.copy(team.team_file(team_stack.root), clone / team.TEAM_FILE)
    env = _env(team_stack)
    _run(["sdpipe", "services", "connect"], clone, env)
    _run(["dvc", "pull"], clone, env)
    assert tree_hashes(clone / "models" / "sd") == tree_hashes(team_stack.root / "models" / "sd")
    assert only_inputs_changed(_run(["dvc", "status"], clone, env).stdout)


def test_generate_samples_the_champion_through_the_server(team_stack, pool_run, tmp_path):
    out = tmp_path / "samples"
    _run(["sdpipe", "generate", "--model", "models:/sdpipe@champion", "--prompt", "a red circle", "-n", "1",
          "--steps", "2", "--out", str(out)], team_stack.root, _env(team_stack))
    assert (out / "grid.png").is_file() and len(list(out.glob("*.png"))) == 2


def _answers(url: str) -> bool:
    try:
        return _status_code(url) == 200
    except OSError:
        return False


def _wait_until_served(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not _answers(url):
        assert server.poll() is None, "mlflow models serve exited early"
        assert time.monotonic() < deadline, f"mlflow models serve did not answer {url} within {seconds} s"
        time.sleep(1)


def test_mlflow_models_serve_scores_the_champion_from_the_server(team_stack, pool_run, tmp_path):
    from PIL import Image

    from pipeline.core.params_file import load_params

    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/sdpipe@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(command, cwd=tmp_path, env=_env(team_stack), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_until_served(f"http://127.0.0.1:{port}/ping", server)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
            data=json.dumps({"dataframe_records": [{"prompt": "a red circle", "seed": 3, "steps": 2}]}).encode())
        with urllib.request.urlopen(request, timeout=120) as reply:
            predictions = json.loads(reply.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    resolution = load_params(team_stack.root / "params.yaml").preprocess.resolution
    assert len(predictions) == 1, (tmp_path / "serve.log").read_text()[-2000:]
    assert Image.open(io.BytesIO(base64.b64decode(predictions[0]["image"]))).size == (resolution, resolution)


def test_a_read_only_login_is_refused_in_a_sentence(team_stack, pool_run, admin):
    import mlflow.server

    settings = team.read_team_settings(team_stack.root)
    mlflow.server.get_app_client("basic-auth", tracking_uri=settings[team.TRACKING_URI]).create_user(
        "reader", "reader-password-1")
    env = _env(team_stack, MLFLOW_TRACKING_USERNAME="reader", MLFLOW_TRACKING_PASSWORD="reader-password-1")
    assert "champion" in _run(["sdpipe", "models"], team_stack.root, env).stdout
    refused = _run(["sdpipe", "promote", "1"], team_stack.root, env, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "'reader' may read but not change" in refused.stderr and settings[team.TRACKING_URI] in refused.stderr


def test_two_runs_triggered_at_once_run_one_after_the_other_and_both_are_recorded(pool_run, all_runs, admin):
    first, second = sorted((pool_run.rerun, all_runs), key=lambda run: _time(run["start_time"]))
    assert (first["state_type"], second["state_type"]) == ("COMPLETED", "COMPLETED")
    assert _time(second["created"]) < _time(first["end_time"]) <= _time(second["start_time"])
    experiment = admin.get_experiment_by_name("sdpipe").experiment_id
    by_flow_run = {run.data.tags.get("prefect_flow_run_id"): run for run in admin.search_runs([experiment])}
    assert sorted(by_flow_run) == sorted([pool_run.killed["id"], all_runs["id"]])
    version = admin.get_model_version_by_alias(EXPERIMENT_MODEL, "champion")
    assert version.run_id == by_flow_run[all_runs["id"]].info.run_id
    champion = admin.get_model_version_by_alias("sdpipe", "champion")
    assert champion.run_id == by_flow_run[pool_run.killed["id"]].info.run_id


def test_no_secret_reaches_params_tags_logs_or_prefect_artifacts(team_stack, pool_run, all_runs, admin):
    champion = admin.get_model_version_by_alias("sdpipe", "champion")
    run = admin.get_run(champion.run_id)
    flow_runs = [pool_run.killed["id"], pool_run.rerun["id"], all_runs["id"]]
    logs = [record for run in flow_runs for record in _prefect_records(team_stack, "logs", run)]
    artifacts = [record for run in flow_runs for record in _prefect_records(team_stack, "artifacts", run)]
    assert logs and [artifact["key"] for artifact in artifacts].count("training-summary") == 2
    texts = {"params": json.dumps(run.data.params), "run tags": json.dumps(run.data.tags),
             "version tags": json.dumps(champion.tags), "description": champion.description or "",
             "flow run logs": json.dumps(logs), "artifacts": json.dumps(artifacts),
             "worker log": (team_stack.state / "logs" / "worker.log").read_text(errors="replace"),
             "committed files": _run(["git", "show", "HEAD"], team_stack.root, os.environ).stdout}
    secrets = [value for key, value in team.read_team_settings(team_stack.root).items() if key in team.SECRET_KEYS]
    secrets += list(team_stack.secret.values())
    leaks = [(where, secret[:4]) for where, text in texts.items() for secret in secrets if secret in text]
    assert not leaks, leaks


# --- faults ---------------------------------------------------------------------------------------------------

@pytest.fixture
def retrained(team_stack, all_runs, tmp_path) -> Path:
    """A copy of the project whose model was trained again (perturbed weights, lower adherence)."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "retrained"
    shutil.copytree(team_stack.root, copy, symlinks=True)
    weights = copy / "models" / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1e-3}, weights)
    metrics = json.loads((copy / "metrics" / "eval.json").read_text())
    (copy / "metrics" / "eval.json").write_text(json.dumps({**metrics, "adherence": metrics["adherence"] - 0.1}))
    return copy


def test_register_with_mlflow_down_says_so_and_its_retry_makes_one_version(team_stack, retrained, admin):
    env, uri = _env(team_stack), team.read_team_settings(team_stack.root)[team.TRACKING_URI]
    services.stop(team_stack.root, team_stack.state, only=("mlflow",))
    try:
        down = _run(["sdpipe", "register"], retrained, env, check=False)
    finally:
        services.start(team_stack.root, team_stack.state, only=("mlflow",), ui=False, fast=True)
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert f"the MLflow server at {uri} is not reachable" in down.stderr

    assert "models:/sdpipe/2 (challenger" in _run(["sdpipe", "register"], retrained, env).stdout
    assert "models:/sdpipe/2 (challenger" in _run(["sdpipe", "register"], retrained, env).stdout
    assert sorted(v.version for v in admin.search_model_versions("name = 'sdpipe'")) == ["1", "2"]

    assert "champion: version 2 (was 1)" in _run(["sdpipe", "promote", "2"], retrained, env).stdout
    assert "champion: version 1" in _run(["sdpipe", "rollback"], retrained, env).stdout


def test_a_registry_without_its_database_says_so(team_stack, all_runs):
    env, uri = _env(team_stack), team.read_team_settings(team_stack.root)[team.TRACKING_URI]
    services.stop(team_stack.root, team_stack.state, only=("postgres",))
    try:
        failed = _run(["sdpipe", "models"], team_stack.root, env, check=False)
    finally:
        services.start(team_stack.root, team_stack.state, only=("postgres",), ui=False, fast=True)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert f"the MLflow server at {uri} failed" in failed.stderr
    assert "champion" in _run(["sdpipe", "models"], team_stack.root, env).stdout


def test_a_push_with_s3_down_fails_whole_and_its_retry_completes(team_stack, retrained):
    from flows.publish import push_outputs

    env = _env(team_stack)
    (retrained / "extra").mkdir()
    (retrained / "extra" / "blob.bin").write_bytes(os.urandom(1 << 20))
    _run(["dvc", "add", "extra"], retrained, env)
    services.stop(team_stack.root, team_stack.state, only=("s3",))
    try:
        with pytest.raises(RuntimeError, match="dvc push to the team remote failed"):
            push_outputs.fn(retrained)
    finally:
        services.start(team_stack.root, team_stack.state, only=("s3",), ui=False, fast=True)
    push_outputs.fn(retrained)
    assert "in sync" in _run(["dvc", "status", "-c"], retrained, env).stdout
    assert push_outputs.retries >= 1
