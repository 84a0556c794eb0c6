"""Content identities: a folder's files, a module's weights. Stages key caches and checkpoints on them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def folder_hash(folder: Path) -> str:
    """sha256 over every file's relative path and content: the identity of a model folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def module_hash(module) -> str:
    """sha256 over a module's parameter names and bytes: the identity of weights loaded from anywhere."""
    import torch  # here, not at the top: hashing a folder (checkpoints, register) must not load torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
