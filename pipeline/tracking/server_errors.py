"""An MLflow server's refusal or absence in one sentence, instead of the client's stack trace.

MLflow raises the same `MlflowException` for a login that may not write (403), a login it does not know
(401), a server it cannot reach and a server that failed (5xx, e.g. its database is down); `sdpipe` says
which it was, which server, and what to do.
"""

from __future__ import annotations

import os
import re
import sys

from pipeline.tracking.runs import is_server

RETRIED_ERRORS = re.compile(r"too many (\d{3}) error responses")  # the client's retries all got a 5xx
UNREACHABLE_MARKS = ("failed with exception", "Max retries exceeded", "Connection refused", "NewConnectionError")


def server_problem(exc: BaseException) -> str | None:
    """The sentence for an MLflow client error that came from a tracking server or the way to it, else None."""
    if "mlflow" not in sys.modules:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    if not isinstance(exc, MlflowException) or not is_server(uri):
        return None
    message, user = str(exc), os.environ.get("MLFLOW_TRACKING_USERNAME")
    retried = RETRIED_ERRORS.search(message)
    if retried:
        return _failed(uri, f"{retried.group(1)} on every try")
    if any(mark in message for mark in UNREACHABLE_MARKS):
        return (f"the MLflow server at {uri} is not reachable: start it (`make services`, or ask whoever runs it) "
                "and run this again")
    status = exc.get_http_status_code()
    if status == 403:
        return (f"the MLflow server at {uri} refused this: the login {user!r} may read but not change this "
                "experiment or model (403 Permission denied); an MLflow admin can grant it EDIT or MANAGE, or "
                "use a login that has it (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, team.env)")
    if status == 401:
        who = f"the login {user!r}" if user else "no login (MLFLOW_TRACKING_USERNAME is not set)"
        return (f"the MLflow server at {uri} did not accept {who} (401): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (team.env holds them for `make services`)")
    if status >= 500:
        return _failed(uri, f"{status}: {message.split('Response body:', 1)[-1].strip()[:200]}")
    return None


def _failed(uri: str, detail: str) -> str:
    return (f"the MLflow server at {uri} failed ({detail}); its database or artifact store may be down: run "
            "this again once the server is healthy")
