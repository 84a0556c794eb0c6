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

In team mode (team.env names a work pool, as `make services` writes it) the deployments are registered on
the team Prefect server's work pool instead and this command returns; the pool's worker runs them, one at a
time (the pool's concurrency limit), in this project folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import prefect
from prefect import serve
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from flows.retrain import retrain_flow
from flows.training import PARAMETER_KEYS, PROJECT_ROOT, training_flow
from pipeline.core import team
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


def deployments(root: Path = PROJECT_ROOT, *, on_pool: bool = False) -> list:
    """The two deployments; `on_pool`: loaded from this folder's source, for a work pool's worker (which
    needs the project at the same path)."""
    params = load_params(root / PARAMS_FILE)
    location = {"project_root": str(root)}
    train_flow, retrain = training_flow, retrain_flow
    if on_pool:
        train_flow = training_flow.from_source(source=str(root), entrypoint="flows/training.py:training_flow")
        retrain = retrain_flow.from_source(source=str(root), entrypoint="flows/retrain.py:retrain_flow")
    train = train_flow.to_deployment(
        name=TRAIN, parameters=location, concurrency_limit=1, tags=["sdpipe"],
        description="Run the DVC stages as task runs. A run that changes a parameter is a DVC experiment "
                    "(`dvc exp show`): params.yaml and the workspace stay as they are.",
    )
    show_current_values(train, root)
    return [
        train,
        retrain.to_deployment(
            name=RETRAIN, parameters=location, cron=params.monitor.retrain_cron, concurrency_limit=1,
            tags=["sdpipe"], description="Check new batches for drift and retrain when the policy says so.",
        ),
    ]


def main() -> int:
    settings = team.read_team_settings(PROJECT_ROOT)
    api = os.environ.get(team.PREFECT_API_URL) or settings.get(team.PREFECT_API_URL)
    if not api:
        print("flows.deploy: PREFECT_API_URL is not set: start `prefect server start` (or `make ui`) and "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api; schedules need a lasting server", file=sys.stderr)
        return 1
    auth = os.environ.get(team.PREFECT_AUTH) or settings.get(team.PREFECT_AUTH)
    # Prefect reads its settings when it is imported: team.env's come in here
    updates = {PREFECT_API_URL: api, **({PREFECT_API_AUTH_STRING: auth} if auth else {})}
    with temporary_settings(updates=updates):
        pool = settings.get(team.WORK_POOL)
        if pool:
            prefect.deploy(*deployments(on_pool=True), work_pool_name=pool, print_next_steps_message=False)
            print(f"deployments {TRAIN} and {RETRAIN} are on work pool {pool!r} at {api}; its worker runs them")
        else:
            serve(*deployments(), limit=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
