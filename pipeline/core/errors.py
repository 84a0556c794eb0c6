"""sdpipe's own errors: what a user can fix, as opposed to a bug.

`sdpipe` prints a `UserError` as its one sentence (what failed, which key or file, what to do) with no
traceback; anything else (a bug, a CUDA out-of-memory, a KeyError deep in a library) keeps its full
traceback. `sdpipe --debug` or `SDPIPE_DEBUG=1` shows the traceback of a `UserError` too.

Each concrete error also derives from the built-in error it is (ValueError, LookupError, ...), so code that
catches those keeps working. The errors of other floors derive from `UserError` the same way
(`ConfigError`, the ingestion sources' `SourceError`, validate's `ValidationFailed`).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message is a sentence naming the key or file and what to do."""


class InputError(UserError, ValueError):
    """A value or file the user gave that cannot be used."""


class NotFoundError(UserError, LookupError):
    """Something asked for is not there (yet): a model folder, a registry version, a champion."""


class NoChampionError(NotFoundError):
    """The registry holds no `champion` version yet (a fresh deployment before its first training)."""
