"""The retraining flow: check every new batch, decide with reasons, and retrain when the policy says so.

Each pending batch in `monitor.incoming` is checked as its own task run (validation, feature and latent
drift, the champion's error on it); the decision and its reasons go to data/monitoring/history.jsonl, to
the MLflow monitoring run (a time series) and to a Prefect markdown artifact. The flow only orchestrates:
every step is an `sdpipe` command (`pending-batches`, `check-batch`, `decide`, `merge-batches`) run as a
subprocess that writes its result as JSON, so no model is loaded in the Prefect process. When it retrains, the
batches' valid samples are merged into data/batches/ and the training flow runs; the register stage's
gate then decides whether the new model becomes champion.

    python -m flows.retrain
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.training import PROJECT_ROOT, stage_environment, training_flow
from pipeline.core.atomic import read_json


def run_command(args: list[str], root: Path, out: Path) -> dict:
    """Run `sdpipe ARGS --out OUT` in the project, streaming its output to the task's log; return OUT's JSON."""
    logger = get_run_logger()
    process = subprocess.Popen(["sdpipe", *args, "--out", str(out)], cwd=root, env=stage_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        logger.info(line.rstrip())
    if process.wait() != 0:
        raise RuntimeError(f"`sdpipe {args[0]}` failed (exit {process.returncode}); see the log above")
    return read_json(out)


@task
def pending(root: Path, work: Path) -> dict:
    return run_command(["pending-batches"], root, work / "pending.json")


@task
def check(folder: str, root: Path, champion: dict, out: Path) -> dict:
    return run_command(["check-batch", folder, "--champion", champion["folder"], "--champion-mse",
                        str(champion["noise_mse"])], root, out)


@task
def decide(reports: list[Path], root: Path, work: Path) -> dict:
    return run_command(["decide", *map(str, reports)], root, work / "decision.json")


@task
def merge(folders: list[str], root: Path, work: Path) -> int:
    return run_command(["merge-batches", *folders], root, work / "merged.json")["merged_samples"]


def decision_markdown(reports: list[dict], decision: dict, champion_version: int) -> str:
    rows = "\n".join(
        f"| {r['batch']} | {r['valid']}/{r['samples']} | {', '.join(r['drifted_features']) or '-'} | "
        f"{r['mmd'].get('pvalue', float('nan')):.3f} | {r['champion'].get('degradation', float('nan')):+.0%} |"
        for r in reports
    )
    reasons = "\n".join(f"- {reason}" for reason in decision["reasons"])
    return (
        f"# Retraining decision: {'retrain' if decision['retrain'] else 'no retraining'}\n\n{reasons}\n\n"
        f"Champion: version {champion_version}\n\n"
        "| batch | valid | drifted features | MMD p | champion MSE vs validation |\n|---|---|---|---|---|\n"
        f"{rows}\n"
    )


@flow(name="sdpipe-retrain")
def retrain_flow(project_root: str = str(PROJECT_ROOT)) -> dict:
    """Check the batches waiting in monitor.incoming and retrain when the policy says so.

    Args:
        project_root: The project folder (holding dvc.yaml and params.yaml) to monitor and retrain.
    """
    logger = get_run_logger()
    root = Path(project_root)
    with tempfile.TemporaryDirectory(prefix="sdpipe-retrain-") as scratch:
        work = Path(scratch)
        plan = pending(root, work)
        if not plan["batches"]:
            logger.info("no new batches in %s", plan["incoming"])
            return dict(retrain=False, reasons=[f"no new batches in {plan['incoming']}"])
        if "no_champion" in plan:  # a fresh deployment: nothing to compare with; the batches stay pending
            logger.warning("%d batches wait: %s", len(plan["batches"]), plan["no_champion"])
            return dict(retrain=False, reasons=[plan["no_champion"]])
        champion = plan["champion"]
        outputs = [work / f"report-{number}.json" for number in range(len(plan["batches"]))]
        reports = [check.with_options(name=f"check {Path(folder).name}")(folder, root, champion, out)
                   for folder, out in zip(plan["batches"], outputs, strict=True)]
        decision = decide(outputs, root, work)
        for reason in decision["reasons"]:
            logger.info("%s", reason)
        create_markdown_artifact(decision_markdown(reports, decision, champion["version"]), key="retraining-decision",
                                 description="why the retraining flow did or did not retrain")
        if decision["retrain"]:
            decision["merged_samples"] = merge(plan["batches"], root, work)
            decision["stages"] = training_flow(project_root)
    return decision


if __name__ == "__main__":
    print(retrain_flow())
