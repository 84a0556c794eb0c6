"""The training flow: each DVC stage of dvc.yaml as its own Prefect task run, in pipeline order.

Without changes a run reproduces the project itself: each task runs `dvc repro --single-item STAGE`, so DVC
decides what is stale (an unchanged stage is skipped and reported as such) and DVC's cache and lock stay
the single source of truth. With changes (or an experiment name) the run is a DVC experiment:
`dvc exp run --temp --set-param KEY=VALUE ... --name NAME` reproduces the pipeline in a temporary copy of
the project, leaving params.yaml, dvc.lock and the workspace's outputs as they are; each stage's output
still goes to its own task run. `dvc exp show` lists the experiment with its params and metrics.

    python -m flows.training            # a local run (Prefect starts a temporary API if none is set)

Transient failures of a stage are retried `monitor.stage_retries` times (an experiment is one DVC command:
it is not retried); at the end the run publishes a markdown artifact with the validation result, the
metrics next to the champion's, the promotion, the experiment and links. In team mode (team.env names a DVC
remote) a run of the project itself then commits dvc.lock and the metrics and pushes the outputs
(flows/publish.py); an experiment stays an experiment (`dvc exp push` shares it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.experiments import (
    STAGE_LINE,
    StageOutput,
    copy_paths,
    experiment_ref,
    leaf_overrides,
    read_json_at,
    set_param_args,
)
from flows.publish import publish
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import EVAL_METRICS, HEADLINE_METRICS, REGISTRY_RECORD, SUMMARY
from pipeline.core.atomic import read_json
from pipeline.core.params_file import PARAMS_FILE, read_params_file, with_overrides
from pipeline.core.source_params import SOURCES
from pipeline.core.team import DVC_REMOTE, apply_team_settings
from pipeline.tracking.lineage import FLOW_RUN_ENV
from pipeline.tracking.runs import is_server, tracking_uri

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SKIPPED_MARK = "didn't change, skipping"
RETRY_DELAY_SECONDS = 10
MLFLOW_UI = "http://127.0.0.1:5000"
# The records of dvc.yaml the summary reads, relative to the project (an experiment's come from its git ref).
_LAYOUT = Paths(PROJECT_ROOT)
VALIDATION_SUMMARY, EVAL_RECORD, REGISTRY_FILE, RUN_RECORD, SAMPLES_GRID = (
    str(path.relative_to(_LAYOUT.root)) for path in (
        _LAYOUT.validation_reports / SUMMARY, _LAYOUT.metrics / EVAL_METRICS, _LAYOUT.metrics / REGISTRY_RECORD,
        _LAYOUT.run_record, _LAYOUT.samples_grid))
# The flow's typed parameters and the params.yaml keys they set.
PARAMETER_KEYS = {"steps": "train.steps", "learning_rate": "train.learning_rate", "batch_size": "train.batch_size",
                  "source": "ingest.source", "mode": "model.mode", "finetune": "model.finetune",
                  "pretrained": "model.pretrained"}


def pipeline_stages(root: Path = PROJECT_ROOT) -> list[str]:
    """Stage names in the order dvc.yaml lists them (which is the order data flows)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"])


def stage_environment() -> dict[str, str]:
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
        cwd=root, env=stage_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    skipped = False
    for line in process.stdout:
        logger.info(line.rstrip())
        skipped = skipped or SKIPPED_MARK in line
    if process.wait() != 0:
        raise RuntimeError(f"stage {stage!r} failed (dvc repro exited {process.returncode}); see the log above")
    return "skipped" if skipped else "ran"


@task(cache_policy=NO_CACHE)
def follow_stage(stage: str, output: StageOutput, last: bool) -> str:
    """Log one stage's part of a running `dvc exp run`; return 'ran' or 'skipped'."""
    logger = get_run_logger()
    started = skipped = False
    for line in output.of_stage(stage, last):
        logger.info(line.rstrip())
        started = started or bool(STAGE_LINE.match(line))
        skipped = skipped or SKIPPED_MARK in line
    if output.ended and output.process.wait() != 0:
        raise RuntimeError(f"the experiment failed in stage {stage!r} (dvc exp run exited "
                           f"{output.process.returncode}); see the log above")
    if not started:
        raise RuntimeError(f"dvc exp run ended without reaching stage {stage!r}; see the log above")
    return "skipped" if skipped else "ran"


def run_experiment(root: Path, name: str, changes: dict[str, Any]) -> dict[str, str]:
    """`dvc exp run --temp` with the changes as --set-param, one task run per stage. The MLflow store stays
    the project's: pipeline/tracking/runs.py anchors it at DVC_ROOT, which DVC points at this folder."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "exp", "run", "--temp", "--name", name, *set_param_args(changes),
         *(arg for path in copy_paths(root) for arg in ("--copy-paths", path))],
        cwd=root, env=stage_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output, stages = StageOutput(process), pipeline_stages(root)
    try:
        return {stage: follow_stage.with_options(name=stage, task_run_name=stage)(stage, output, stage == stages[-1])
                for stage in stages}
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def flow_overrides(root: Path, typed: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The typed parameters that differ from params.yaml, as dotted keys, on top of the free-form overrides.

    A typed parameter equal to the current value is no change: the deployment's form shows the current
    values, and submitting it untouched must not start an experiment.
    """
    current = read_params_file(root / PARAMS_FILE)

    def value_at(dotted: str) -> Any:
        node = current
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    changed = {PARAMETER_KEYS[name]: value for name, value in typed.items()
               if value is not None and value != value_at(PARAMETER_KEYS[name])}
    return {**(overrides or {}), **changed}


def mlflow_run_link(tracking: str, run: dict) -> str:
    """The run's page in the MLflow UI: the tracking server's own in team mode, else `make ui-mlflow`'s."""
    page = f"/#/experiments/{run.get('experiment_id', '')}/runs/{run.get('run_id', '')}"
    return tracking.rstrip("/") + page if is_server(tracking) else f"`make ui-mlflow`, then {MLFLOW_UI}{page}"


def run_summary(read: Callable[[str], dict], changes: dict[str, Any], outcomes: dict[str, str],
                experiment: str | None, tracking: str) -> str:
    """Markdown for the flow run's artifact: validation, metrics against the champion, promotion, links
    (`tracking`: the MLflow tracking URI the stages used)."""
    validation, metrics, registry, run = (read(path) for path in
                                          (VALIDATION_SUMMARY, EVAL_RECORD, REGISTRY_FILE, RUN_RECORD))
    champion_value = registry.get("previous_champion_value")
    lines = [
        "# sdpipe training run", "",
        f"- DVC experiment: **{experiment}** (`dvc exp show`; `dvc exp diff {experiment}`; "
        f"`dvc exp apply {experiment}`; `dvc exp branch {experiment} BRANCH`)" if experiment else
        "- DVC experiment: none (the project itself was reproduced)",
        f"- overrides: {changes or 'none'}",
        "- stages: " + ", ".join(f"{stage} {outcome}" for stage, outcome in outcomes.items()),
        f"- validation: {validation.get('total', '?')} rows, {validation.get('quarantined', '?')} quarantined "
        f"({'passed' if validation.get('passed') else 'failed'})",
        f"- model: {registry.get('model_name', '?')} version {registry.get('version', '?')}, "
        + ("**promoted to champion**" if registry.get("promoted") else
           f"champion stays version {registry.get('champion_version', '?')}"),
        f"- gate {registry.get('gate_metric', '?')} ({registry.get('gate_rule', '?')}): "
        f"{_number(registry.get('gate_value'))} vs champion {_number(champion_value)}"
        + (f"; not promoted: {registry['refused']}" if registry.get("refused") else ""),
        f"- MLflow run: {run.get('run_id', '?')} ({mlflow_run_link(tracking, run)})",
        "- sample grid: the MLflow run's evaluation/samples.png"
        + ("" if experiment else f", and {SAMPLES_GRID}"), "",
        "| metric | value |", "|---|---|",
        *(f"| {name} | {metrics[name]:.4g} |" for name in HEADLINE_METRICS if name in metrics),
    ]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@flow(name="sdpipe-train")
def training_flow(
    project_root: str = str(PROJECT_ROOT),
    steps: int | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    source: Literal[SOURCES] | None = None,
    mode: Literal["scratch", "finetune"] | None = None,
    finetune: Literal["full", "lora"] | None = None,
    pretrained: str | None = None,
    overrides: dict[str, Any] | None = None,
    experiment: str | None = None,
) -> dict[str, str]:
    """Run every DVC stage as a task; with changes, as a DVC experiment that leaves params.yaml as it is.

    Args:
        project_root: The project folder (holding dvc.yaml and params.yaml) the stages run in.
        steps: train.steps: optimizer steps of the UNet training.
        learning_rate: train.learning_rate: AdamW's peak learning rate.
        batch_size: train.batch_size: images per step and process.
        source: ingest.source: where the training images come from.
        mode: model.mode: scratch trains every network here; finetune starts from model.pretrained.
        finetune: model.finetune: in finetune mode, train the whole UNet (full) or LoRA layers on it (lora).
        pretrained: model.pretrained: a diffusers folder (relative to the project) or a hub id, for finetune.
        overrides: Any other params.yaml keys, dotted, e.g. {"train.snr_gamma": 5.0, "evaluate.guidance_scale": 5}.
        experiment: Name of the DVC experiment (default: this flow run's name). A run with changes is always
            an experiment; naming one without changes re-runs the current params as an experiment.
    """
    logger = get_run_logger()
    root = Path(project_root)
    team = apply_team_settings(root)  # the team's MLflow login for this process and the stages it starts
    typed = dict(steps=steps, learning_rate=learning_rate, batch_size=batch_size, source=source, mode=mode,
                 finetune=finetune, pretrained=pretrained)
    changes = leaf_overrides(flow_overrides(root, typed, overrides))  # as --set-param sets them
    params = with_overrides(root / PARAMS_FILE, changes)  # a bad key fails here, before any stage runs
    tracking = tracking_uri(params.register_, root)
    if changes or experiment:
        experiment = experiment or flow_run.name
        logger.info("DVC experiment %r with %s", experiment, changes or "the current params")
        outcomes = run_experiment(root, experiment, changes)
        ref = experiment_ref(root, experiment)
        summary = run_summary(lambda path: read_json_at(root, ref, path), changes, outcomes, experiment, tracking)
    else:
        outcomes = {stage: run_stage.with_options(
            name=stage, task_run_name=stage, retries=params.monitor.stage_retries,
            retry_delay_seconds=RETRY_DELAY_SECONDS,
        )(stage, root) for stage in pipeline_stages(root)}
        summary = run_summary(lambda path: read_json(root / path) if (root / path).is_file() else {},
                              changes, outcomes, None, tracking)
        if team.get(DVC_REMOTE):  # team mode: what a colleague needs goes to git and the DVC remote
            summary += "\n\n" + publish(root, params.register_, REGISTRY_FILE, team[DVC_REMOTE],
                                          flow_run.name or "local")
    create_markdown_artifact(summary, key="training-summary",
                             description="experiment, validation, metrics against the champion, promotion and links")
    return outcomes


if __name__ == "__main__":
    print(training_flow())
