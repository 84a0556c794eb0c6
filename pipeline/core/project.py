"""Which project a stage runs for: DVC runs an experiment's stages in a copy under .dvc/tmp/exps and names
the project itself in DVC_ROOT."""

from __future__ import annotations

import os
from pathlib import Path

DVC_ROOT_ENV = "DVC_ROOT"  # DVC sets it to the project while a stage runs (in an experiment's copy too)


def project_root(root: Path) -> Path:
    """The project DVC runs the stage for (inside an experiment's copy under .dvc/tmp/exps), else `root`."""
    return Path(os.environ.get(DVC_ROOT_ENV) or root)
