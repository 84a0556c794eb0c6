"""The team stack needs nothing installed on the machine beyond the project's own extras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline import services


def test_postgresql_comes_from_the_project_install_not_the_machine():
    initdb = Path(services._pg_tool("initdb"))
    assert initdb.is_relative_to(Path(sys.prefix)), initdb  # inside the virtualenv: the team extra's pgserver wheel
    version = subprocess.run(services._as_postgres([str(initdb), "--version"]), capture_output=True, text=True,
                             check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # no PostgreSQL on it
    assert version.stdout.startswith("initdb (PostgreSQL) 16."), version.stdout
