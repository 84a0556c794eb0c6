"""What ties a run to the code, data and settings that made it: the lineage tags and the flat params.

Every run is tagged with the git commit, the DVC hash of the processed data (from dvc.lock) and a hash of
the params; a run inside a Prefect flow or `dvc exp run` also carries the flow run's id or the experiment's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import yaml

from pipeline.core.config import Params

PROCESSED_DATA_OUT = "data/processed"
FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"
EXPERIMENT_ENV = "DVC_EXP_NAME"  # set by DVC for the stages it runs
EXPERIMENT_TAG = "dvc_experiment"


def params_hash(params: Params) -> str:
    canonical = json.dumps(params.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_version(root: Path) -> str:
    """The DVC md5 of data/processed recorded in dvc.lock, or 'unknown' outside a DVC run."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return "unknown"
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    for out in stages.get("preprocess", {}).get("outs", []):
        if out.get("path") == PROCESSED_DATA_OUT:
            return out.get("md5", "unknown")
    return "unknown"


def lineage_tags(params: Params, root: Path) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(root),
        "data_version": data_version(root),
        "params_hash": params_hash(params),
    }
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    if os.environ.get(EXPERIMENT_ENV):
        tags[EXPERIMENT_TAG] = os.environ[EXPERIMENT_ENV]
    return tags


def flat_params(params: Params) -> dict[str, str]:
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = str(value)

    walk("", params.model_dump(mode="json", by_alias=True))
    return flat
