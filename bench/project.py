"""A bench's own copy of this repository, run through the real DVC: shared by bench/scale.py and bench/defaults.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a plain copy of the repo, nothing installed

from pipeline.core.params_file import read_params_file  # noqa: E402

BIN = Path(sys.executable).parent  # dvc.yaml's commands are `sdpipe ...`: this virtualenv's scripts
QUIET = {"DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "false",
         "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
         "HF_HUB_DISABLE_TELEMETRY": "1"}  # the Makefile's exports


def copy_repository(folder: Path) -> None:
    """This repository's files, tracked and new but not ignored, as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # not a file: deleted in the working tree, or a symlink (.venv)
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)


def set_params(project: Path, settings: dict[str, object]) -> None:
    """Write dotted keys (`ray.num_cpus`) into the project's params.yaml, adding sections it lacks."""
    params = read_params_file(project / "params.yaml")
    for dotted, value in settings.items():
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def new_project(folder: Path, settings: dict[str, object]) -> Path:
    """A fresh copy of the repository with `settings` in its params.yaml, committed in its own git repository
    (so DVC is set up as the repository has it)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    copy_repository(folder)
    set_params(folder, settings)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=folder, check=True, capture_output=True)
    return folder


def dvc(project: Path, *arguments: str) -> tuple[float, str]:
    """`dvc ARGUMENTS` in the project (running the project's own code): wall seconds and output."""
    env = {**os.environ, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(project)}
    started = time.perf_counter()
    done = subprocess.run(["dvc", *arguments], cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"dvc {' '.join(arguments)} failed in {project}:\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds, done.stdout + done.stderr


def commit_of(folder: Path) -> str:
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=folder, capture_output=True, text=True)
    return described.stdout.strip()
