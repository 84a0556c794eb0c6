"""Content identities: a folder's files. Stages key caches and checkpoints on them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def folder_hash(folder: Path) -> str:
    """sha256 over every file's relative path and content: the identity of a model folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as file:  # streamed: a text encoder's shard can be larger than memory
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()
