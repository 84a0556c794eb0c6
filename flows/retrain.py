"""The retraining flow: check every new batch, decide with reasons, and retrain when the policy says so.

Each pending batch in `monitor.incoming` is checked as its own task run (validation, feature and latent
drift, the champion's error on it); the decision and its reasons go to data/monitoring/history.jsonl,
to the MLflow monitoring run (a time series) and to a Prefect markdown artifact. When it retrains, the
batches' valid samples are merged into data/batches/ and the training flow runs; the register stage's
gate then decides whether the new model becomes champion.

    python -m flows.retrain
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.training import PROJECT_ROOT, training_flow
from pipeline.config import load_params, PARAMS_FILE
from pipeline.contracts.paths import Paths
from pipeline.monitor import (
    BatchReport, Decision, champion_reference, check_batch, decide, log_monitoring, merge_batches, pending_batches,
    record,
)


@task
def check(folder: Path, project_root: str, champion: Path, champion_mse: float) -> BatchReport:
    root = Path(project_root)
    return check_batch(folder, load_params(root / PARAMS_FILE), Paths(root), champion, champion_mse)


def decision_markdown(reports: list[BatchReport], decision: Decision, champion_version: int) -> str:
    rows = "\n".join(
        f"| {r.batch} | {r.valid}/{r.samples} | {', '.join(r.drifted_features) or '-'} | "
        f"{r.mmd.get('pvalue', float('nan')):.3f} | {r.champion.get('degradation', float('nan')):+.0%} |"
        for r in reports
    )
    reasons = "\n".join(f"- {reason}" for reason in decision.reasons)
    return (
        f"# Retraining decision: {'retrain' if decision.retrain else 'no retraining'}\n\n{reasons}\n\n"
        f"Champion: version {champion_version}\n\n"
        "| batch | valid | drifted features | MMD p | champion MSE vs validation |\n|---|---|---|---|---|\n"
        f"{rows}\n"
    )


@flow(name="sdpipe-retrain")
def retrain_flow(project_root: str = str(PROJECT_ROOT)) -> dict:
    logger = get_run_logger()
    root = Path(project_root)
    params, paths = load_params(root / PARAMS_FILE), Paths(root)
    folders = pending_batches(params.monitor, paths)
    if not folders:
        logger.info("no new batches in %s", params.monitor.incoming)
        return dict(retrain=False, reasons=[f"no new batches in {params.monitor.incoming}"])
    champion, champion_mse, version = champion_reference(params, paths)
    reports = [check.with_options(name=f"check {folder.name}")(folder, project_root, champion, champion_mse)
               for folder in folders]
    decision = decide(reports, params.monitor)
    for reason in decision.reasons:
        logger.info("%s", reason)
    record(paths, reports, decision)
    log_monitoring(params, paths, reports, decision)
    create_markdown_artifact(decision_markdown(reports, decision, version), key="retraining-decision",
                             description="why the retraining flow did or did not retrain")
    outcome = asdict(decision)
    if decision.retrain:
        outcome["merged_samples"] = merge_batches(folders, params, paths)
        outcome["stages"] = training_flow(project_root)
    return outcome


if __name__ == "__main__":
    print(retrain_flow())
