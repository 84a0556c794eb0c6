"""The training flow: each DVC stage of dvc.yaml as its own Prefect task run, in pipeline order.

Each task runs `dvc repro --single-item STAGE`, so DVC still decides what is stale: an unchanged
stage is skipped (and reported as such) and DVC's cache and lock stay the single source of truth.

    python -m flows.training            # a local run (Prefect starts a temporary API if none is set)

Transient failures of a stage are retried `monitor.stage_retries` times; at the end the run publishes a
markdown artifact with the validation result, the metrics next to the champion's, the promotion and links.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from pipeline.atomic import read_json
from pipeline.config import PARAMS_FILE, apply_overrides, load_params
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import EVAL_METRICS, HEADLINE_METRICS, REGISTRY_RECORD, SUMMARY
from pipeline.tracking import FLOW_RUN_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SKIPPED_MARK = "didn't change, skipping"
RETRY_DELAY_SECONDS = 10
MLFLOW_UI = "http://127.0.0.1:5000"


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


def flow_overrides(steps: int | None, learning_rate: float | None, source: str | None, mode: str | None,
                   pretrained: str | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The typed parameters as dotted params.yaml keys, on top of the free-form overrides."""
    typed = {"train.steps": steps, "train.learning_rate": learning_rate, "ingest.source": source, "model.mode": mode,
             "model.pretrained": pretrained}
    return {**(overrides or {}), **{key: value for key, value in typed.items() if value is not None}}


def run_summary(root: Path, changes: dict[str, Any], outcomes: dict[str, str]) -> str:
    """Markdown for the flow run's artifact: validation, metrics against the champion, promotion, links."""
    paths = Paths(root)

    def load(path: Path) -> dict:
        return read_json(path) if path.is_file() else {}

    validation, metrics = load(paths.validation_reports / SUMMARY), load(paths.metrics / EVAL_METRICS)
    registry, run = load(paths.metrics / REGISTRY_RECORD), load(paths.run_record)
    champion_value = registry.get("previous_champion_value")
    lines = [
        "# sdpipe training run", "",
        f"- overrides: {changes or 'none'}",
        "- stages: " + ", ".join(f"{stage} {outcome}" for stage, outcome in outcomes.items()),
        f"- validation: {validation.get('total', '?')} rows, {validation.get('quarantined', '?')} quarantined "
        f"({'passed' if validation.get('passed') else 'failed'})",
        f"- model: {registry.get('model_name', '?')} version {registry.get('version', '?')}, "
        + ("**promoted to champion**" if registry.get("promoted") else
           f"champion stays version {registry.get('champion_version', '?')}"),
        f"- gate {registry.get('gate_metric', '?')}: {registry.get('gate_value', float('nan')):.4g} "
        f"vs champion {'-' if champion_value is None else f'{champion_value:.4g}'}",
        f"- MLflow run: {run.get('run_id', '?')} (`make ui-mlflow`, then "
        f"{MLFLOW_UI}/#/experiments/{run.get('experiment_id', '')}/runs/{run.get('run_id', '')})",
        f"- sample grid: {paths.samples_grid}", "",
        "| metric | value |", "|---|---|",
        *(f"| {name} | {metrics[name]:.4g} |" for name in HEADLINE_METRICS if name in metrics),
    ]
    return "\n".join(lines)


@flow(name="sdpipe-train")
def training_flow(
    project_root: str = str(PROJECT_ROOT),
    steps: int | None = None,
    learning_rate: float | None = None,
    source: Literal["synthetic", "folder", "manifest", "hf"] | None = None,
    mode: Literal["scratch", "finetune"] | None = None,
    pretrained: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Run every DVC stage as a task. Parameters other than `project_root` are written into params.yaml
    (dotted keys in `overrides`, e.g. {"train.batch_size": 32}) before the stages run, so DVC, the MLflow
    run and a later `dvc repro` all see the same settings."""
    logger = get_run_logger()
    root = Path(project_root)
    changes = flow_overrides(steps, learning_rate, source, mode, pretrained, overrides)
    params = apply_overrides(root / PARAMS_FILE, changes) if changes else load_params(root / PARAMS_FILE)
    if changes:
        logger.info("params.yaml overrides: %s", changes)
    outcomes = {}
    for stage in pipeline_stages(root):
        outcomes[stage] = run_stage.with_options(
            name=stage, task_run_name=stage, retries=params.monitor.stage_retries,
            retry_delay_seconds=RETRY_DELAY_SECONDS,
        )(stage, root)
    create_markdown_artifact(run_summary(root, changes, outcomes), key="training-summary",
                             description="validation, metrics against the champion, promotion and links")
    return outcomes


if __name__ == "__main__":
    print(training_flow())
