"""The team settings file, team.env: where sdpipe, its flows and `make` find the shared servers.

One `KEY=VALUE` a line (a shell can `set -a; . ./team.env`). `sdpipe services start` writes it for the
stack it starts on this machine; a team with servers elsewhere writes it by hand (docs/guides/team-setup.md).
Without the file everything stays on the embedded default (SQLite, no server). A variable already set in
the environment wins over the file. The file holds logins: it is git-ignored and readable by its owner only.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.project import project_root

TEAM_FILE = "team.env"
TRACKING_URI, TRACKING_USERNAME, TRACKING_PASSWORD = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
PREFECT_API_URL, PREFECT_AUTH = "PREFECT_API_URL", "PREFECT_API_AUTH_STRING"
WORK_POOL = "SDPIPE_WORK_POOL"
DVC_REMOTE, DVC_ENDPOINT, DVC_KEY_ID, DVC_SECRET = (
    "SDPIPE_DVC_REMOTE", "SDPIPE_DVC_ENDPOINT", "SDPIPE_DVC_ACCESS_KEY_ID", "SDPIPE_DVC_SECRET_ACCESS_KEY")
SECRET_KEYS = (TRACKING_PASSWORD, PREFECT_AUTH, DVC_SECRET)


def team_file(root: Path) -> Path:
    """team.env of the project (an experiment's copy has none)."""
    return project_root(root) / TEAM_FILE


def read_team_settings(root: Path) -> dict[str, str]:
    path = team_file(root)
    if not path.is_file():
        return {}
    settings = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        settings[key.strip()] = value.strip()
    return settings


def write_team_settings(root: Path, settings: dict[str, str], header: str) -> Path:
    """Write team.env readable by its owner only (it holds logins), replacing it in one step."""
    path = Path(root) / TEAM_FILE
    temporary = path.with_name(f".{TEAM_FILE}.tmp")
    lines = [f"# {line}" for line in header.splitlines()] + [f"{key}={value}" for key, value in settings.items()]
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(temporary, path)
    return path


def apply_team_settings(root: Path) -> dict[str, str]:
    """Put team.env's settings into this process's environment (what is set already wins); return them."""
    settings = read_team_settings(root)
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    return settings

