"""Stage `register`: log models/sd to MLflow, register a version, and move the `champion` alias.

Every new version gets the alias `challenger`; `champion` moves only when the gate in params passes
(`register.gate_metric` better than the champion's by more than `register.min_improvement`; the first
version always passes). The same model files never make a second version. Writes
metrics/registry.json. `promote`, `rollback` and `list_versions` back the `sdpipe` registry commands.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.config import Params, Paths, RegisterParams
from pipeline.evaluate import HEADLINE_METRICS, METRICS as EVAL_METRICS, read_metrics
from pipeline.tracking import EXPERIMENT_TAG, folder_hash, lineage_tags, model_run, use_experiment

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_HASH_TAG = "model_hash"
METRIC_TAG_PREFIX = "metric."
RECORD = "registry.json"
SERVING_PACKAGES = ("diffusers", "transformers", "torch", "pillow", "pandas", "safetensors", "accelerate")


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: int
    model_hash: str
    promoted: bool
    champion_version: int
    gate_metric: str
    gate_value: float
    previous_champion_value: float | None
    reused_existing_version: bool


def gate_passes(new: float, champion: float | None, params: RegisterParams) -> bool:
    if champion is None:
        return True
    gain = new - champion if params.gate_direction == "maximize" else champion - new
    return gain > params.min_improvement


def serving_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in SERVING_PACKAGES] + [
        f"mlflow=={metadata.version('mlflow')}"
    ]


def serving_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    inputs = Schema([
        ColSpec(DataType.string, "prompt"),
        ColSpec(DataType.string, "negative_prompt", required=False),
        ColSpec(DataType.long, "seed", required=False),
        ColSpec(DataType.long, "steps", required=False),
        ColSpec(DataType.double, "guidance", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(DataType.string, "image")]))


def _existing_version(client, name: str, model_hash: str):
    matches = client.search_model_versions(f"name = '{name}' and tags.{MODEL_HASH_TAG} = '{model_hash}'")
    return min(matches, key=lambda version: int(version.version)) if matches else None


def _champion_value(client, name: str, metric: str) -> tuple[int | None, float | None]:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    value = champion.tags.get(METRIC_TAG_PREFIX + metric)
    return int(champion.version), float(value) if value is not None else None


def _log_new_version(params: Params, paths: Paths, metrics: dict, model_hash: str):
    import mlflow

    from pipeline.mlflow_model import PIPELINE_ARTIFACT

    settings = params.register_
    with model_run(params, paths) as run:
        logged = mlflow.get_run(run.info.run_id).data.metrics
        mlflow.log_metrics({f"eval_{k}": v for k, v in metrics.items() if f"eval_{k}" not in logged})
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("mlflow_model.py")),
            artifacts={PIPELINE_ARTIFACT: str(paths.sd_model)},
            signature=serving_signature(),
            pip_requirements=serving_requirements(),
        )
        version = mlflow.register_model(info.model_uri, settings.model_name)
    client = mlflow.MlflowClient()
    tags = {**lineage_tags(params, paths.root), MODEL_HASH_TAG: model_hash, "run_id": run.info.run_id}
    tags.update({METRIC_TAG_PREFIX + name: str(value) for name, value in metrics.items()})
    for key, value in tags.items():
        client.set_model_version_tag(settings.model_name, version.version, key, value)
    client.update_model_version(settings.model_name, version.version, description=version_description(metrics, tags))
    return version


def version_description(metrics: dict, tags: dict) -> str:
    """What a reviewer reads on the version's page in the MLflow UI."""
    headline = "\n".join(f"| {name} | {metrics[name]:.4g} |" for name in HEADLINE_METRICS if name in metrics)
    return (
        f"Headline metrics (metrics/eval.json; every metric is a `{METRIC_TAG_PREFIX}*` tag):\n\n"
        f"| metric | value |\n|---|---|\n{headline}\n\n"
        f"git commit `{tags.get('git_commit', 'unknown')}`, data version `{tags.get('data_version', 'unknown')}`, "
        f"params hash `{tags.get('params_hash', 'unknown')}`, MLflow run `{tags['run_id']}`"
        + (f", DVC experiment `{tags[EXPERIMENT_TAG]}` (`dvc exp show`)" if EXPERIMENT_TAG in tags else "")
    )


def register(params: Params, paths: Paths) -> Registration:
    settings = params.register_
    metrics = read_metrics(paths)
    if settings.gate_metric not in metrics:
        raise KeyError(
            f"register.gate_metric: {settings.gate_metric!r} is not in {paths.metrics / EVAL_METRICS} "
            f"(available: {', '.join(sorted(metrics))})"
        )
    client = _registry_client(params, paths)
    model_hash = folder_hash(paths.sd_model)
    existing = _existing_version(client, settings.model_name, model_hash)
    version = existing or _log_new_version(params, paths, metrics, model_hash)
    if existing is None:
        client.set_registered_model_alias(settings.model_name, CHALLENGER, version.version)

    champion_version, champion_value = _champion_value(client, settings.model_name, settings.gate_metric)
    value = float(metrics[settings.gate_metric])
    is_champion = champion_version == int(version.version)
    promoted = not is_champion and gate_passes(value, champion_value, settings)
    if promoted:
        move_champion(client, settings.model_name, int(version.version), reason=f"gate passed on {settings.gate_metric}")
        champion_version = int(version.version)
    result = Registration(
        model_name=settings.model_name,
        version=int(version.version),
        model_hash=model_hash,
        promoted=promoted,
        champion_version=champion_version,
        gate_metric=settings.gate_metric,
        gate_value=value,
        previous_champion_value=champion_value,
        reused_existing_version=existing is not None,
    )
    write_json(paths.metrics / RECORD, asdict(result))
    log.info("register: %s version %s%s", settings.model_name, result.version,
             " promoted to champion" if promoted else f" (champion stays version {champion_version})")
    return result


PREVIOUS_CHAMPION_TAG = "previous_champion"


def move_champion(
    client, name: str, version: int, *, reason: str, by: str = "sdpipe register", record_previous: bool = True
) -> int | None:
    """Point `champion` at `version`, remembering who moved it, why, and which version it replaces
    (a rollback keeps the target's own record, so rollbacks can go back step by step)."""
    from mlflow.exceptions import MlflowException

    try:
        previous = int(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, CHAMPION, str(version))
    tags = {"promoted_by": by, "promoted_reason": reason, "promoted_at": datetime.now(UTC).isoformat()}
    if record_previous and previous is not None and previous != version:
        tags[PREVIOUS_CHAMPION_TAG] = str(previous)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return previous


def _registry_client(params: Params, paths: Paths):
    import mlflow

    use_experiment(params.register_, paths.root)
    return mlflow.MlflowClient()


def list_versions(params: Params, paths: Paths) -> list[dict]:
    """Every version of the model, newest first, with its aliases and headline metrics."""
    client = _registry_client(params, paths)
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
            git_commit=v.tags.get("git_commit", "unknown"),
        )
        for v in sorted(versions, key=lambda v: int(v.version), reverse=True)
    ]


def promote(params: Params, paths: Paths, version: int, *, reason: str, by: str) -> int | None:
    """Make `version` the champion by hand; returns the version it replaced."""
    from mlflow.exceptions import MlflowException

    client = _registry_client(params, paths)
    name = params.register_.model_name
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise LookupError(f"{name} has no version {version} (see `sdpipe models`)") from None
    return move_champion(client, name, version, reason=reason, by=by)


def rollback(params: Params, paths: Paths, *, reason: str, by: str) -> int:
    """Give `champion` back to the version it replaced; returns that version."""
    from mlflow.exceptions import MlflowException

    client = _registry_client(params, paths)
    name = params.register_.model_name
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        raise LookupError(f"{name} has no champion to roll back") from None
    previous = current.tags.get(PREVIOUS_CHAMPION_TAG)
    if previous is None:
        raise LookupError(f"{name} version {current.version} replaced no earlier champion; nothing to roll back to")
    move_champion(client, name, int(previous), reason=f"rollback from version {current.version}: {reason}", by=by,
                  record_previous=False)
    return int(previous)
