"""Team mode against the real servers of `sdpipe services` (one stack for the session, tests/conftest.py)."""

import json
import os
import shutil
import subprocess
import sys
import stat
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from pipeline import services
from pipeline.core import team

from .conftest import tree_hashes

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

TRIGGER = ("from prefect.deployments import run_deployment; "
           "r = run_deployment('sdpipe-train/train', timeout=1500, poll_interval=2); print(r.id, r.state.type.value)")


def _env(stack, **extra: str) -> dict[str, str]:
    """A client's environment: team.env's settings, this venv's scripts first, quick MLflow retries."""
    return {**os.environ, **team.read_team_settings(stack.root), "PREFECT_HOME": str(stack.state / "prefect-client"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", **extra}


def _run(command: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert not check or result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def pool_run(team_stack):
    """`make deploy`'s command in team mode (deployments onto the work pool), then one run of the train
    deployment, which the stack's worker picks up: the tiny pipeline, registered on the server, pushed."""
    env = _env(team_stack)
    _run([sys.executable, "-m", "flows.deploy"], team_stack.root, env)
    flow_run_id, state = _run([sys.executable, "-c", TRIGGER], team_stack.root, env).stdout.split()[-2:]
    return flow_run_id, state


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

    assert pool_run[1] == "COMPLETED"
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
    assert champion.tags["prefect_flow_run_id"] == pool_run[0]


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


def test_no_secret_reaches_params_tags_logs_or_prefect_artifacts(team_stack, pool_run, admin):
    champion = admin.get_model_version_by_alias("sdpipe", "champion")
    run = admin.get_run(champion.run_id)
    logs = _prefect_records(team_stack, "logs", pool_run[0])
    artifacts = _prefect_records(team_stack, "artifacts", pool_run[0])
    assert logs and any(artifact["key"] == "training-summary" for artifact in artifacts)
    texts = {"params": json.dumps(run.data.params), "run tags": json.dumps(run.data.tags),
             "version tags": json.dumps(champion.tags), "description": champion.description or "",
             "flow run logs": json.dumps(logs), "artifacts": json.dumps(artifacts),
             "worker log": (team_stack.state / "logs" / "worker.log").read_text(errors="replace"),
             "committed files": _run(["git", "show", "HEAD"], team_stack.root, os.environ).stdout}
    secrets = [value for key, value in team.read_team_settings(team_stack.root).items() if key in team.SECRET_KEYS]
    secrets += list(team_stack.secret.values())
    leaks = [(where, secret[:4]) for where, text in texts.items() for secret in secrets if secret in text]
    assert not leaks, leaks


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
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], clone, env).stdout


def test_generate_samples_the_champion_through_the_server(team_stack, pool_run, tmp_path):
    out = tmp_path / "samples"
    _run(["sdpipe", "generate", "--model", "models:/sdpipe@champion", "--prompt", "a red circle", "-n", "1",
          "--steps", "2", "--out", str(out)], team_stack.root, _env(team_stack))
    assert (out / "grid.png").is_file() and len(list(out.glob("*.png"))) == 2


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


# --- faults ---------------------------------------------------------------------------------------------------

@pytest.fixture
def retrained(team_stack, pool_run, tmp_path) -> Path:
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


def test_a_registry_without_its_database_says_so(team_stack, pool_run):
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
