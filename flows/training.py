"""The training flow: each DVC stage of dvc.yaml as its own Prefect task run, in pipeline order.

Each task runs `dvc repro --single-item STAGE`, so DVC still decides what is stale: an unchanged
stage is skipped (and reported as such) and DVC's cache and lock stay the single source of truth.

    python -m flows.training            # a local run (Prefect starts a temporary API if none is set)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from pipeline.tracking import FLOW_RUN_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SKIPPED_MARK = "didn't change, skipping"


def pipeline_stages(root: Path = PROJECT_ROOT) -> list[str]:
    """Stage names in the order dvc.yaml lists them (which is the order data flows)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"])


def _stage_environment() -> dict[str, str]:
    """Stage commands are `sdpipe ...`: this interpreter's scripts come first on PATH, and the flow
    run id travels to the MLflow run as a tag."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        FLOW_RUN_ENV: str(flow_run.id or ""),
    }


@task
def run_stage(stage: str, root: Path) -> str:
    """Run one stage through DVC, streaming its output to the task's log; return 'ran' or 'skipped'."""
    logger = get_run_logger()
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=root, env=_stage_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    skipped = False
    for line in process.stdout:
        logger.info(line.rstrip())
        skipped = skipped or SKIPPED_MARK in line
    if process.wait() != 0:
        raise RuntimeError(f"stage {stage!r} failed (dvc repro exited {process.returncode}); see the log above")
    return "skipped" if skipped else "ran"


@flow(name="sdpipe-train")
def training_flow(project_root: str = str(PROJECT_ROOT)) -> dict[str, str]:
    root = Path(project_root)
    outcomes = {}
    for stage in pipeline_stages(root):
        outcomes[stage] = run_stage.with_options(name=stage)(stage, root)
    return outcomes


if __name__ == "__main__":
    print(training_flow())
