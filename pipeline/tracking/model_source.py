"""Where a model to sample from comes from: a local diffusers folder, or a registry URI such as
`models:/sdpipe@champion` downloaded from MLflow (generate and monitoring use it).

A registry model is downloaded once per version into the model cache (`SDPIPE_CACHE_DIR`, else
`$XDG_CACHE_HOME/sdpipe` or `~/.cache/sdpipe`), keyed by name, version and run, and reused by every later
call: an SDXL or Flux model is gigabytes. Delete the folder to reclaim the space.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.contracts.paths import Paths
from pipeline.core.atomic import atomic_dir
from pipeline.core.config import RegisterParams
from pipeline.core.errors import InputError, NotFoundError
from pipeline.tracking.runs import registry_client
from pipeline.tracking.server_errors import server_problem

REGISTRY_SCHEME = "models:/"
CACHE_ENV = "SDPIPE_CACHE_DIR"
MODEL_FILE = "MLmodel"


def resolve_model(model: str, register: RegisterParams, paths: Paths) -> Path:
    """A local diffusers folder as is; a `models:/NAME@ALIAS` (or `/VERSION`) URI from the model cache,
    downloaded from MLflow the first time."""
    if not model.startswith(REGISTRY_SCHEME):
        folder = Path(model)
        if not (folder / "model_index.json").is_file():
            raise InputError(f"{folder}: not a diffusers folder (no model_index.json); run `dvc repro` first")
        return folder
    import mlflow

    from pipeline.tracking.mlflow_model import PIPELINE_ARTIFACT

    client = registry_client(register, paths.root)
    try:
        version = registry_version(client, model)
        cached = cache_dir() / "models" / version.name / f"v{version.version}-{version.run_id}"
        if not (cached / MODEL_FILE).is_file():
            with atomic_dir(cached) as staging:
                mlflow.artifacts.download_artifacts(  # the version found, even if the alias moves meanwhile
                    artifact_uri=f"{REGISTRY_SCHEME}{version.name}/{version.version}", dst_path=str(staging))
    except mlflow.exceptions.MlflowException as exc:
        raise NotFoundError(server_problem(exc) or
                            f"{model}: not found in the MLflow registry at {mlflow.get_tracking_uri()} ({exc})") from None
    return pipeline_folder(cached, PIPELINE_ARTIFACT)


def registry_version(client, model: str):
    """The model version a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI names."""
    name, _, version = model[len(REGISTRY_SCHEME):].partition("/")
    if version:
        return client.get_model_version(name, version)
    name, _, alias = name.partition("@")
    if not alias:
        raise InputError(f"{model}: name a version or an alias, as in {REGISTRY_SCHEME}{name}@champion")
    return client.get_model_version_by_alias(name, alias)


def cache_dir() -> Path:
    """Where downloaded registry models are kept between commands."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdpipe"


def pipeline_folder(model_dir: Path, artifact: str) -> Path:
    """Where the pyfunc's MLmodel says the diffusers folder artifact was stored."""
    mlmodel = yaml.safe_load((model_dir / MODEL_FILE).read_text(encoding="utf-8"))
    return model_dir / mlmodel["flavors"]["python_function"]["artifacts"][artifact]["path"]
