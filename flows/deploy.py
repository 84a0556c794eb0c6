"""Create and serve the two deployments on the Prefect server named by PREFECT_API_URL.

- `sdpipe-train/train`: manual; its parameters (steps, learning rate, source, mode, ..., other params.yaml
  keys, an experiment name) are a form in the UI's "Custom run", each with its description and, as its
  default, the value params.yaml holds when this command starts (restart it after editing params.yaml).
  A run that changes any of them is a DVC experiment; params.yaml is never written.
- `sdpipe-retrain/retrain`: on `monitor.retrain_cron` from params.yaml (daily by default).

This process runs the flow runs itself, at most one at a time, so two trainings never share the project
folder; each deployment also carries a concurrency limit of one.

    make ui                        # Prefect server and MLflow UI (another terminal)
    make deploy                    # = PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefect import serve

from flows.retrain import retrain_flow
from flows.training import PARAMETER_KEYS, PROJECT_ROOT, training_flow
from pipeline.core.params_file import PARAMS_FILE, load_params, read_params_file

TRAIN, RETRAIN = "train", "retrain"


def show_current_values(deployment, root: Path) -> None:
    """Each typed parameter of the custom-run form starts at the value params.yaml holds (not an empty
    optional field); the flow treats a value equal to params.yaml as no change."""
    current = read_params_file(root / PARAMS_FILE)
    properties = deployment._parameter_openapi_schema.properties  # Prefect edits it the same way (readOnly)
    for name, dotted in PARAMETER_KEYS.items():
        value = current
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        schema = properties[name]
        typed = next((branch for branch in schema.pop("anyOf", []) if branch.get("type") != "null"), {})
        schema.update(typed, default=value)


def deployments(root: Path = PROJECT_ROOT) -> list:
    params = load_params(root / PARAMS_FILE)
    location = {"project_root": str(root)}
    train = training_flow.to_deployment(
        name=TRAIN, parameters=location, concurrency_limit=1, tags=["sdpipe"],
        description="Run the DVC stages as task runs. A run that changes a parameter is a DVC experiment "
                    "(`dvc exp show`): params.yaml and the workspace stay as they are.",
    )
    show_current_values(train, root)
    return [
        train,
        retrain_flow.to_deployment(
            name=RETRAIN, parameters=location, cron=params.monitor.retrain_cron, concurrency_limit=1,
            tags=["sdpipe"], description="Check new batches for drift and retrain when the policy says so.",
        ),
    ]


def main() -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print("flows.deploy: PREFECT_API_URL is not set: start `prefect server start` (or `make ui`) and "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api; schedules need a lasting server", file=sys.stderr)
        return 1
    serve(*deployments(), limit=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
