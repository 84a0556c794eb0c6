"""Create and serve the two deployments on the Prefect server named by PREFECT_API_URL.

- `sdpipe-train/train`: manual; its parameters (steps, learning rate, source, mode, params.yaml
  overrides) are a form in the UI's "Custom run".
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
from flows.training import PROJECT_ROOT, training_flow
from pipeline.config import PARAMS_FILE, load_params

TRAIN, RETRAIN = "train", "retrain"


def deployments(root: Path = PROJECT_ROOT) -> list:
    params = load_params(root / PARAMS_FILE)
    location = {"project_root": str(root)}
    return [
        training_flow.to_deployment(
            name=TRAIN, parameters=location, concurrency_limit=1, tags=["sdpipe"],
            description="Run the DVC stages as task runs; set overrides to change params.yaml for this run.",
        ),
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
