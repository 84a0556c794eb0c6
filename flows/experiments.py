"""DVC experiments for flow runs: a run with overrides is `dvc exp run --temp --set-param ...`.

The experiment runs in a temporary copy of the project under .dvc/tmp/exps, so params.yaml, dvc.lock and
the workspace's outputs stay as they are; DVC keeps the result as an experiment (`dvc exp show`) that
can be compared, applied or branched. The stages see `DVC_EXP_NAME` (the experiment's name, which
pipeline/tracking/runs.py records) and `DVC_ROOT` (this project, where the MLflow store lives).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

LOCK_FILE = "dvc.lock"
STAGE_LINE = re.compile(r"^(?:Running stage|Stage) '([^']+)'")


def leaf_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys down to the leaves: {"validate.max_empty_caption_share": {"folder": 0.3}} becomes
    {"validate.max_empty_caption_share.folder": 0.3}, which `--set-param` can set without replacing siblings."""
    leaves: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            leaves.update(leaf_overrides({f"{key}.{inner}": item for inner, item in value.items()}))
        else:
            leaves[key] = value
    return leaves


def hydra_value(value: Any) -> str:
    """A value in the override grammar `dvc exp run --set-param` parses (Hydra's): JSON's numbers, true/false,
    null, double-quoted strings and [lists] read back as the same values."""
    return json.dumps(value, ensure_ascii=False)


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """`--set-param ++KEY=VALUE` for every leaf of the overrides (`++`: set the key whether or not
    params.yaml has it yet; the keys were validated against the typed params first)."""
    args = []
    for key, value in leaf_overrides(overrides).items():
        args += ["--set-param", f"++{key}={hydra_value(value)}"]
    return args


def _declared(entries: list) -> dict[str, dict]:
    """dvc.yaml's `- path` and `- path: {options}` entries as {path: options}."""
    return {path: options or {} for entry in entries
            for path, options in (entry.items() if isinstance(entry, dict) else [(entry, {})])}


def copy_paths(root: Path) -> list[str]:
    """What the temporary copy needs, beyond git's committed files and DVC's cache, to start from this
    workspace's state: dvc.lock when it is not committed, the outputs DVC does not cache (metrics, reports,
    models/mlflow_run.json: without them DVC would re-run their stages) and the dependencies no stage
    produces where git does not hold them (data/batches' merged batches: without them ingest would run
    without the batches). models/ is in git (its .gitignore) so that models/mlflow_run.json can be copied
    alone."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"].values()
    outputs = {path: options for stage in stages for kind in ("outs", "metrics", "plots")
               for path, options in _declared(stage.get(kind, [])).items()}
    uncached = [path for path, options in outputs.items() if options.get("cache") is False]
    sources = [path for stage in stages for path in stage.get("deps", [])
               if not any(path == output or path.startswith(output + "/") for output in outputs)]
    wanted = [path for path in dict.fromkeys([LOCK_FILE, *uncached, *sources]) if (root / path).exists()]
    return _untracked_tops(root, wanted) if wanted else []


def _git_files(root: Path, *args: str) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, text=True, check=True)
    return [entry.rstrip("/") for entry in listed.stdout.split("\0") if entry]


def _untracked_tops(root: Path, paths: list[str]) -> list[str]:
    """The untracked files and folders under `paths`, each lifted to the topmost folder git holds nothing
    of (DVC copies a file only into a folder the copy has, and a folder only where the copy has none)."""
    tracked_folders = {str(parent) for path in _git_files(root) for parent in Path(path).parents}
    tops = []
    for entry in _git_files(root, "--others", "--directory", "--", *paths):
        while str(Path(entry).parent) not in tracked_folders:
            entry = str(Path(entry).parent)
        tops.append(entry)
    return sorted(entry for entry in set(tops)
                  if not any(Path(entry).is_relative_to(other) and entry != other for other in tops))


def experiment_ref(root: Path, name: str) -> str:
    """The git ref DVC stores experiment `name` under: refs/exps/<baseline commit split 2/38>/<name>."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()
    return f"refs/exps/{head[:2]}/{head[2:]}/{name}"


def read_json_at(root: Path, revision: str, path: str) -> dict:
    """A JSON file as committed in `revision` (an experiment's ref), or {} when it has no such file."""
    shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


class StageOutput:
    """The output of one `dvc exp run`, handed out stage by stage: DVC starts each stage with
    "Running stage 'X'" (or reports "Stage 'X' didn't change"), so every stage's lines can go to its own
    task run although one command runs them all."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.ended = False  # the command's output is exhausted
        self._pending: str | None = None

    def _lines(self) -> Iterator[str]:
        if self._pending is not None:
            line, self._pending = self._pending, None
            yield line
        for line in self.process.stdout:  # not `yield from`: closing this generator would close the pipe
            yield line
        self.ended = True

    def of_stage(self, stage: str, last: bool) -> Iterator[str]:
        """The lines up to the next stage's first line (for the last stage: to the end)."""
        started = False
        for line in self._lines():
            found = STAGE_LINE.match(line)
            if found and started and not last:
                self._pending = line
                return
            if found and found.group(1) != stage:
                raise RuntimeError(f"dvc exp run reached stage {found.group(1)!r} where {stage!r} was expected")
            started = started or bool(found)
            yield line
