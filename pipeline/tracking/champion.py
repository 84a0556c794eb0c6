"""The registry's aliases by hand and by gate: who is `champion`, moving it, listing versions, rolling back.

`register` moves `champion` when its gate passes; `sdpipe models | promote | rollback` use the same moves,
each recording who moved the alias, why, and which version it replaced.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.contracts.paths import Paths
from pipeline.contracts.records import CHAMPION, METRIC_TAG_PREFIX
from pipeline.core.config import Params
from pipeline.core.errors import NoChampionError, NotFoundError
from pipeline.tracking.runs import registry_client

GATE_TAG_PREFIX = "gate."
PREVIOUS_CHAMPION_TAG = "previous_champion"
# what the registry answers for a model or an alias it does not hold (a refused login is another code)
NOT_HELD = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def current_champion(client, name: str):
    """The `champion` model version, or None while the registry has none (a fresh deployment)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code not in NOT_HELD:
            raise
        return None


def require_champion(client, name: str):
    """The `champion` model version; NoChampionError while there is none."""
    champion = current_champion(client, name)
    if champion is None:
        raise NoChampionError(f"{name} has no champion version yet: train and register a first model (`dvc repro`, "
                              "or a run of the sdpipe-train deployment); until then there is nothing to compare with")
    return champion


def move_champion(
    client, name: str, version: int, *, reason: str, by: str = "sdpipe register", record_previous: bool = True
) -> int | None:
    """Point `champion` at `version`, remembering who moved it, why, and which version it replaces
    (a rollback keeps the target's own record, so rollbacks can go back step by step)."""
    champion = current_champion(client, name)
    previous = None if champion is None else int(champion.version)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    tags = {"promoted_by": by, "promoted_reason": reason, "promoted_at": datetime.now(UTC).isoformat()}
    if record_previous and previous is not None and previous != version:
        tags[PREVIOUS_CHAMPION_TAG] = str(previous)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return previous


def list_versions(params: Params, paths: Paths) -> list[dict]:
    """Every version of the model, newest first, with its aliases, headline metrics and description."""
    client = registry_client(params.register_, paths.root)
    name = params.register_.model_name
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        return []
    # search results leave aliases empty; the registered model holds the alias -> version map
    aliases = client.get_registered_model(name).aliases
    return [
        dict(
            version=int(v.version),
            aliases=sorted(alias for alias, held in aliases.items() if int(held) == int(v.version)),
            metrics={k[len(METRIC_TAG_PREFIX):]: float(t) for k, t in v.tags.items() if k.startswith(METRIC_TAG_PREFIX)},
            gate={k[len(GATE_TAG_PREFIX):]: t for k, t in v.tags.items() if k.startswith(GATE_TAG_PREFIX)},
            git_commit=v.tags.get("git_commit", "unknown"),
            description=v.description or "",
        )
        for v in sorted(versions, key=lambda v: int(v.version), reverse=True)
    ]


def promote(params: Params, paths: Paths, version: int, *, reason: str, by: str) -> int | None:
    """Make `version` the champion by hand; returns the version it replaced."""
    from mlflow.exceptions import MlflowException

    client = registry_client(params.register_, paths.root)
    name = params.register_.model_name
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise NotFoundError(f"{name} has no version {version} (see `sdpipe models`)") from None
    return move_champion(client, name, version, reason=reason, by=by)


def rollback(params: Params, paths: Paths, *, reason: str, by: str) -> int:
    """Give `champion` back to the version it replaced; returns that version."""
    client = registry_client(params.register_, paths.root)
    name = params.register_.model_name
    current = current_champion(client, name)
    if current is None:
        raise NoChampionError(f"{name} has no champion to roll back")
    previous = current.tags.get(PREVIOUS_CHAMPION_TAG)
    if previous is None:
        raise NotFoundError(f"{name} version {current.version} replaced no earlier champion; nothing to roll back to")
    move_champion(client, name, int(previous), reason=f"rollback from version {current.version}: {reason}", by=by,
                  record_previous=False)
    return int(previous)
