"""Team mode's last step of a training run: commit what DVC needs, push DVC's outputs, tag the version.

A colleague then needs a clone at that commit, team.env and `dvc pull` to hold the run's exact files:
dvc.lock names every output's hash; the outputs DVC does not cache (metrics, the run record, reports) are
committed beside it, so `dvc status` finds nothing to re-run; the cached ones (data, models/sd) go to the
team's DVC remote. So do the batches the retraining flow merged into data/batches (an ingest dep that no
stage produces): the first publish with merged batches moves the folder from git (which kept it as an empty
folder) to DVC, as data/batches.dvc, so the commit names them and `dvc push` stores them. Committing on the
project's branch (rather than keeping the run as a DVC experiment and `dvc exp push`) because the flow
reproduced the project itself: its branch is where the result belongs, and `git log dvc.lock` lists every
published run. The registered version is tagged with that commit, the remote and the model's DVC hash, so
the registry leads to the files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import task

from pipeline.core.atomic import read_json
from pipeline.core.config import RegisterParams
from pipeline.tracking.runs import registry_client

LOCK = "dvc.lock"
MODEL_OUT = "models/sd"
BATCHES, BATCHES_FILE = "data/batches", "data/batches.dvc"
PUSH_RETRIES, PUSH_RETRY_DELAY_SECONDS = 3, 20
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "sdpipe flow", "GIT_AUTHOR_EMAIL": "sdpipe-flow@localhost",
                "GIT_COMMITTER_NAME": "sdpipe flow", "GIT_COMMITTER_EMAIL": "sdpipe-flow@localhost"}
COMMIT_TAG, REMOTE_TAG, MODEL_MD5_TAG = "dvc.commit", "dvc.remote", "dvc.models_sd_md5"


def outputs(root: Path) -> dict[str, bool]:
    """Every output, metric and plot of dvc.yaml, and whether DVC caches it (if not, git carries it)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    found = {}
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                found[path] = (options or {}).get("cache", True)
    return found


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    configured = subprocess.run(["git", "config", "user.name"], cwd=root, capture_output=True, text=True)
    env = {**os.environ, **({} if configured.stdout.strip() else GIT_IDENTITY)}
    return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True)


def has_merged_batches(root: Path) -> bool:
    folder = root / BATCHES
    return folder.is_dir() and any(entry.is_dir() for entry in folder.iterdir())


@task
def version_batches(root: Path) -> bool:
    """`dvc add data/batches` when it holds merged batches; True when data/batches.dvc now names them.

    Without batches nothing changes, so a fresh clone of a project that never merged one still finds the
    folder in git and runs without a remote. DVC refuses a folder git holds a file of: the placeholder leaves
    git's index here (the commit records that) and stays in the folder as DVC data. The files keep their
    bytes, so ingest's dep in dvc.lock keeps its hash and nothing turns stale."""
    if not has_merged_batches(root):
        return False
    if _git(root, "ls-files", "--", BATCHES).stdout.strip():
        _git(root, "rm", "-r", "-q", "--cached", "--", BATCHES)
    added = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", BATCHES], cwd=root, capture_output=True,
                           text=True)
    if added.returncode != 0:
        reason = (added.stderr.strip() or added.stdout.strip()).splitlines()[-1:]
        raise RuntimeError(f"dvc add {BATCHES} failed (exit {added.returncode}): "
                           f"{reason[0] if reason else 'no output'}")
    return True


@task
def commit_run(root: Path, message: str) -> str:
    """Commit dvc.lock, the uncached outputs, data/batches.dvc and the .gitignore files DVC keeps beside the
    cached outputs (nothing else of the workspace); return HEAD."""
    kept = outputs(root)
    cached_outs = [path for path, cached in kept.items() if cached] + [BATCHES]
    gitignores = {(Path(path).parent / ".gitignore").as_posix() for path in cached_outs}
    paths = [path for path in (LOCK, *(path for path, cached in kept.items() if not cached), BATCHES_FILE,
                               *sorted(gitignores))
             if (root / path).exists()]
    ignored = subprocess.run(["git", "check-ignore", "--stdin"], cwd=root, input="\n".join(paths),
                             capture_output=True, text=True).stdout.split()
    _git(root, "add", "-A", "--", *(path for path in paths if path not in ignored))
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=root).returncode != 0:
        _git(root, "commit", "-q", "-m", message)
    return _git(root, "rev-parse", "HEAD").stdout.strip()


@task(retries=PUSH_RETRIES, retry_delay_seconds=PUSH_RETRY_DELAY_SECONDS)
def push_outputs(root: Path) -> str:
    """`dvc push` to the default remote. S3 objects are written whole or not at all and DVC skips those the
    remote has, so a push that failed half-way is simply run again (Prefect retries it)."""
    pushed = subprocess.run([sys.executable, "-m", "dvc", "push"], cwd=root, capture_output=True, text=True)
    if pushed.returncode != 0:
        reason = (pushed.stderr.strip() or pushed.stdout.strip()).splitlines()[-1:]
        raise RuntimeError(f"dvc push to the team remote failed (exit {pushed.returncode}): "
                           f"{reason[0] if reason else 'no output'}")
    return pushed.stdout.strip().splitlines()[-1] if pushed.stdout.strip() else "pushed"


def checkout_tags(root: Path, commit: str, remote: str) -> dict[str, str]:
    """What a colleague needs to fetch the registered version: the commit, the remote, the model's DVC hash."""
    lock = yaml.safe_load((root / LOCK).read_text(encoding="utf-8")) or {}
    model_md5 = next((out.get("md5", "unknown") for out in lock.get("stages", {}).get("train", {}).get("outs", [])
                      if out.get("path") == MODEL_OUT), "unknown")
    return {COMMIT_TAG: commit, REMOTE_TAG: remote, MODEL_MD5_TAG: model_md5}


def publish(root: Path, register: RegisterParams, registry_record: str, remote: str, run_name: str) -> str:
    """Commit, push, then tag the registered version; returns the summary's line."""
    record = read_json(root / registry_record)
    name, version = record["model_name"], str(record["version"])
    version_batches(root)
    commit = commit_run(root, f"sdpipe run {run_name}: dvc.lock and metrics of models:/{name}/{version}")
    pushed = push_outputs(root)
    client = registry_client(register, root)
    for key, value in checkout_tags(root, commit, remote).items():
        client.set_model_version_tag(name, version, key, value)
    return (f"- published: commit `{commit[:10]}` holds dvc.lock and the metrics, DVC's outputs are in {remote} "
            f"({pushed}); a colleague: `git checkout {commit[:10]}`, `sdpipe services connect`, `dvc pull`")
