"""Publishing a run versions the retraining batches it trained on: a colleague's clone `dvc pull`s them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO, tiny_params_dict, tree_hashes, write_pattern

PROJECT_FILES = (".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "dvc.yaml", "data/.gitkeep",
                 "data/batches/.gitkeep", "models/.gitignore")


def _run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # sdpipe
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd)


def _dvc(cwd: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


def project(root: Path, remote: Path) -> Path:
    """The project's git and DVC set-up (its ignore files, dvc.yaml, the empty data/batches), committed, with a
    local-folder DVC remote in .dvc/config.local as `sdpipe services connect` writes the team's."""
    for name in PROJECT_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "project")
    _dvc(root, "remote", "add", "--local", "-d", "team", str(remote))
    return root


def test_a_clone_of_the_published_commit_pulls_the_merged_batches_and_ingest_stays_up_to_date(tmp_path):
    """The retraining flow's order: batches merged, ingest run on them, the run published. A colleague's clone
    of the published commit pulls the batches, and ingest (which read them) is up to date there and here."""
    from flows.publish import BATCHES_FILE, commit_run, push_outputs, version_batches

    from .test_pipeline_e2e import copy_repository

    root = copy_repository(tmp_path / "project", tiny_params_dict())
    _dvc(root, "remote", "add", "--local", "-d", "team", str(tmp_path / "remote"))
    for seed in range(2):
        write_pattern(root / "data" / "batches" / "batch-1" / f"{seed}.png", seed)
        (root / "data" / "batches" / "batch-1" / f"{seed}.txt").write_text(f"caption {seed}")
    merged = tree_hashes(root / "data" / "batches")
    _dvc(root, "repro", "-q", "ingest")  # and the inputs stage it depends on

    assert version_batches.fn(root)
    commit = commit_run.fn(root, "publish")
    push_outputs.fn(root)

    committed = _git(root, "ls-files").split()
    assert BATCHES_FILE in committed and "data/batches/.gitkeep" not in committed
    assert _git(root, "status", "--porcelain", "--", "data") == "", "publishing left data/ files uncommitted"
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(root), str(clone))
    _git(clone, "checkout", "-q", commit)
    _dvc(clone, "remote", "add", "--local", "-d", "team", str(tmp_path / "remote"))
    _dvc(clone, "pull", "-q", "inputs", "class_images", "ingest", "data/batches.dvc")  # only they ran: dvc.lock names no other
    assert tree_hashes(clone / "data" / "batches") == merged
    for where in (root, clone):
        assert "up to date" in _dvc(where, "status", "ingest"), f"ingest is stale in {where.name}"


def test_without_merged_batches_publishing_leaves_the_folder_in_git(tmp_path):
    """A project that never merged a batch keeps data/batches in git: a fresh clone needs no remote."""
    from flows.publish import BATCHES_FILE, version_batches

    root = project(tmp_path / "project", tmp_path / "remote")
    assert not version_batches.fn(root)
    assert not (root / BATCHES_FILE).exists()
    assert "data/batches/.gitkeep" in _git(root, "ls-files").split()
