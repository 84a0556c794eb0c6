"""Where a model to sample from comes from: a local diffusers folder, or a registry URI such as
`models:/sdpipe@champion` downloaded from MLflow (generate and monitoring use it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.contracts.paths import Paths
from pipeline.core.config import RegisterParams
from pipeline.tracking.runs import use_experiment
from pipeline.tracking.server_errors import server_problem

REGISTRY_SCHEME = "models:/"


def resolve_model(model: str, register: RegisterParams, paths: Paths) -> Path:
    """A local diffusers folder as is; a `models:/NAME@ALIAS` (or `/VERSION`) URI downloaded from MLflow."""
    if not model.startswith(REGISTRY_SCHEME):
        folder = Path(model)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder}: not a diffusers folder (no model_index.json); run `dvc repro` first")
        return folder
    import mlflow

    from pipeline.tracking.mlflow_model import PIPELINE_ARTIFACT

    use_experiment(register, paths.root)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(server_problem(exc) or
                          f"{model}: not found in the MLflow registry at {mlflow.get_tracking_uri()} ({exc})") from None
    return pipeline_folder(local, PIPELINE_ARTIFACT)


def pipeline_folder(model_dir: Path, artifact: str) -> Path:
    """Where the pyfunc's MLmodel says the diffusers folder artifact was stored."""
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))
    return model_dir / mlmodel["flavors"]["python_function"]["artifacts"][artifact]["path"]
