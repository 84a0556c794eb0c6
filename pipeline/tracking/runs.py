"""MLflow plumbing shared by train, evaluate and register: one run follows the model.

`train` opens the run and writes its id to models/mlflow_run.json; `evaluate` and `register` log
into the same run, which carries the lineage tags (pipeline.tracking.lineage).

Inside `dvc exp run --temp` the stages run in a copy of the project under .dvc/tmp/exps; DVC then sets
`DVC_ROOT` to the project itself, and the MLflow store (a relative sqlite path, the artifacts folder) is
anchored there, so experiments log into the same store as every other run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.contracts.paths import Paths
from pipeline.core.atomic import read_json, write_json
from pipeline.core.config import Params, RegisterParams
from pipeline.core.project import project_root
from pipeline.core.team import TRACKING_URI, apply_team_settings, read_team_settings
from pipeline.tracking.lineage import flat_params, lineage_tags

ARTIFACTS_DIR = "mlartifacts"
# Read once at import: mlflow.set_tracking_uri() writes this variable, so reading it later would
# return whichever store this process touched last instead of the one the user chose.
USER_TRACKING_URI = os.environ.get(TRACKING_URI)
SERVER_SCHEMES = ("http://", "https://")


def tracking_uri(params: RegisterParams, root: Path) -> str:
    """`MLFLOW_TRACKING_URI` wins, then team.env's (pipeline/core/team.py), then `register.tracking_uri`; a
    relative sqlite path is anchored at the project root."""
    uri = USER_TRACKING_URI or read_team_settings(root).get(TRACKING_URI) or params.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(project_root(root) / uri[len(prefix):])
    return uri


def is_server(uri: str) -> bool:
    return uri.startswith(SERVER_SCHEMES)


def use_store(params: RegisterParams, root: Path) -> str:
    """Point MLflow at the configured store, creating nothing in it (a login that may only read can read);
    return its URI."""
    import mlflow

    uri = tracking_uri(params, root)
    apply_team_settings(root)  # team.env's login: MLflow reads it from the environment at each request
    mlflow.set_tracking_uri(uri)
    return uri


def use_experiment(params: RegisterParams, root: Path) -> str:
    """Point MLflow at the configured store and experiment, creating the experiment on first use (for
    writers only: runs and monitoring); return the experiment id."""
    import mlflow

    uri = use_store(params, root)
    experiment = mlflow.get_experiment_by_name(params.experiment)
    if experiment is not None:
        return experiment.experiment_id
    if is_server(uri):  # the server stores the artifacts (its bucket); a local folder would stay on this machine
        return mlflow.create_experiment(params.experiment)
    artifacts = (project_root(root) / ARTIFACTS_DIR).resolve().as_uri()
    return mlflow.create_experiment(params.experiment, artifact_location=artifacts)


def _still_stored(run_id: str | None) -> str | None:
    """`run_id` when the tracking store still holds that run (mlflow.db may have been deleted)."""
    import mlflow

    if run_id is None:
        return None
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return run_id


@contextmanager
def training_run(params: Params, paths: Paths, resume_run_id: str | None = None) -> Iterator[object]:
    """Open a new run for a training (or continue `resume_run_id`, the run of a training resumed from a
    checkpoint, when the store still has it); its id goes beside the model for the later stages."""
    import mlflow

    experiment_id = use_experiment(params.register_, paths.root)
    resume_run_id = _still_stored(resume_run_id)
    with mlflow.start_run(run_id=resume_run_id, experiment_id=experiment_id) as run:
        if resume_run_id is None:
            mlflow.set_tags(lineage_tags(params, paths.root))
            mlflow.log_params(flat_params(params))
        write_json(paths.run_record, {"run_id": run.info.run_id, "experiment_id": experiment_id})
        yield run


@contextmanager
def model_run(params: Params, paths: Paths) -> Iterator[object]:
    """Resume the run that trained models/sd, or start a fresh one when the store no longer has it
    (for example after mlflow.db was deleted)."""
    import mlflow

    experiment_id = use_experiment(params.register_, paths.root)
    run_id = _still_stored(read_json(paths.run_record)["run_id"] if paths.run_record.is_file() else None)
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id) as run:
        if run_id is None:
            mlflow.set_tags(lineage_tags(params, paths.root))
            mlflow.log_params(flat_params(params))
        yield run


def registry_client(register: RegisterParams, root: Path):
    """An MLflow client on the project's tracking store (the model registry); the registry needs no
    experiment, so reading it creates none."""
    import mlflow

    use_store(register, root)
    return mlflow.MlflowClient()
