"""Stage `register`: log models/sd to MLflow, register a version, and move the `champion` alias.

Every new version gets the alias `challenger`; `champion` moves only when the gate passes: the gate metric
better than the champion's by more than `register.min_improvement`, or no champion yet. The gate metric is
`register.gate_metric`, or with `auto` the data's own (`choose_gate`). A gate metric that eval.json lacks,
that the champion lacks, or that is untrustworthy (label adherence from a classifier that reads real images
worse than `register.min_classifier_accuracy`) refuses promotion with the reason; it never passes silently.
The same model files never make a second version. Writes metrics/registry.json; the version's `gate.*`
tags say which metric decided and how. The alias moves themselves, shared with `sdpipe promote` and
`rollback`, are pipeline.tracking.champion's.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from importlib import metadata

from pipeline.contracts.paths import Paths
from pipeline.contracts.records import (
    CALL_HEADING,
    CHALLENGER,
    EVAL_METRICS,
    HEADLINE_METRICS,
    METRIC_TAG_PREFIX,
    MODEL_CARD,
    PROMPTS,
    REGISTRY_RECORD,
    call_in_card,
    read_metrics,
    read_unavailable,
)
from pipeline.core.atomic import read_json, write_json
from pipeline.core.config import ConfigError, Params, RegisterParams
from pipeline.core.hashing import folder_hash
from pipeline.tracking.champion import GATE_TAG_PREFIX, current_champion, move_champion
from pipeline.tracking.lineage import EXPERIMENT_TAG, lineage_tags
from pipeline.tracking.runs import model_run, registry_client

log = logging.getLogger(__name__)

MODEL_HASH_TAG = "model_hash"
FAMILY_TAG = "model_family"  # model.family: which pipeline class the version loads as
LOWER_IS_BETTER = ("noise_mse", "noise_rmse", "noise_mae", "vae_mse", "fid", "kid")  # and their _t<step>, _std
SERVING_PACKAGES = ("diffusers", "transformers", "torch", "pillow", "pandas", "safetensors", "accelerate")


@dataclass(frozen=True)
class Gate:
    metric: str
    direction: str  # maximize | minimize
    rule: str  # why this metric decides


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: int
    model_hash: str
    promoted: bool
    champion_version: int | None
    gate_metric: str
    gate_direction: str
    gate_rule: str
    gate_value: float | None
    previous_champion_value: float | None
    refused: str | None  # why the gate could not be trusted to promote, else None
    reused_existing_version: bool


def direction_of(metric: str) -> str:
    lower = any(metric == name or metric.startswith(f"{name}_") for name in LOWER_IS_BETTER)
    return "minimize" if lower else "maximize"


def choose_gate(settings: RegisterParams, metrics: dict) -> Gate:
    """The metric that decides promotion. `auto` follows the data: the colour-and-shape adherence where
    evaluate computed it (the synthetic source), label adherence where the data is labelled, else the
    validation noise-prediction MSE at fixed timesteps and noise (every model has it)."""
    if settings.gate_metric != "auto":
        direction = direction_of(settings.gate_metric) if settings.gate_direction == "auto" else settings.gate_direction
        return Gate(settings.gate_metric, direction, "register.gate_metric")
    if "adherence" in metrics:
        return Gate("adherence", "maximize", "auto: the synthetic source's colour-and-shape adherence")
    if "label_adherence" in metrics:
        return Gate("label_adherence", "maximize", "auto: labelled data, label adherence")
    return Gate("noise_mse", "minimize", "auto: no sample check applies to this data, validation noise MSE")


def untrusted_reason(gate: Gate, metrics: dict, unavailable: dict, settings: RegisterParams) -> str | None:
    """Why the gate metric cannot promote a model, or None when it can."""
    if gate.metric not in metrics:
        return f"{gate.metric} is not in eval.json: {unavailable[gate.metric]}"
    if gate.metric.startswith("label_adherence"):
        accuracy = metrics.get("classifier_accuracy")
        if accuracy is None:
            return f"label adherence without classifier_accuracy: {unavailable.get('classifier_accuracy', 'missing')}"
        if accuracy < settings.min_classifier_accuracy:
            return (f"the label classifier reads {accuracy:.1%} of the real validation images right, below "
                    f"register.min_classifier_accuracy={settings.min_classifier_accuracy:g}")
    return None


def gate_passes(new: float, champion: float | None, direction: str, min_improvement: float) -> bool:
    if champion is None:
        return True
    gain = new - champion if direction == "maximize" else champion - new
    return gain > min_improvement


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


def serving_example(paths: Paths):
    """A request the registry shows and MLflow runs once at logging (a smoke test of the served model): the
    first evaluation prompt, one sampling step."""
    import pandas as pd

    prompts = read_json(paths.metrics / EVAL_METRICS).get(PROMPTS) or [""]
    return pd.DataFrame([{"prompt": prompts[0], "seed": 0, "steps": 1}])


def _existing_version(client, name: str, model_hash: str):
    matches = client.search_model_versions(f"name = '{name}' and tags.{MODEL_HASH_TAG} = '{model_hash}'")
    return min(matches, key=lambda version: int(version.version)) if matches else None


def _champion_value(client, name: str, metric: str) -> tuple[int | None, float | None]:
    champion = current_champion(client, name)
    if champion is None:
        return None, None
    value = champion.tags.get(METRIC_TAG_PREFIX + metric)
    return int(champion.version), float(value) if value is not None else None


def _log_new_version(params: Params, paths: Paths, metrics: dict, model_hash: str):
    import mlflow

    from pipeline.tracking import mlflow_model
    from pipeline.tracking.mlflow_model import PIPELINE_ARTIFACT

    settings = params.register_
    with model_run(params, paths) as run:
        logged = mlflow.get_run(run.info.run_id).data.metrics
        mlflow.log_metrics({f"eval_{k}": v for k, v in metrics.items() if f"eval_{k}" not in logged})
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=mlflow_model.__file__,
            artifacts={PIPELINE_ARTIFACT: str(paths.sd_model)},
            signature=serving_signature(),
            input_example=serving_example(paths),
            pip_requirements=serving_requirements(),
        )
        tags = {**lineage_tags(params, paths.root), MODEL_HASH_TAG: model_hash, "run_id": run.info.run_id,
                FAMILY_TAG: params.model.family}
        tags.update({METRIC_TAG_PREFIX + name: str(value) for name, value in metrics.items()})
        # the tags arrive with the version in one request: a register cut off after it (a server gone
        # away) finds this version by its model hash when it is run again, instead of making a second one
        version = mlflow.register_model(info.model_uri, settings.model_name, tags=tags)
    client = mlflow.MlflowClient()
    call = call_in_card((paths.sd_model / MODEL_CARD).read_text(encoding="utf-8"))
    client.update_model_version(settings.model_name, version.version,
                                description=version_description(metrics, tags, call))
    return version


def version_description(metrics: dict, tags: dict, call: str | None) -> str:
    """What a reviewer reads on the version's page in the MLflow UI: the headline metrics, the lineage, and the
    model card's plain-diffusers call (the version's `pipeline` artifact is the card's models/sd)."""
    headline = "\n".join(f"| {name} | {metrics[name]:.4g} |" for name in HEADLINE_METRICS if name in metrics)
    usage = (f"\n\n{CALL_HEADING}\n\nThe model card's call, run where `models/sd` is this version's model folder "
             f"(its `pipeline` artifact):\n\n```python\n{call}```") if call else ""
    return (
        f"Headline metrics (metrics/eval.json; every metric is a `{METRIC_TAG_PREFIX}*` tag):\n\n"
        f"| metric | value |\n|---|---|\n{headline}\n\n"
        f"git commit `{tags.get('git_commit', 'unknown')}`, data version `{tags.get('data_version', 'unknown')}`, "
        f"params hash `{tags.get('params_hash', 'unknown')}`, MLflow run `{tags['run_id']}`"
        + (f", DVC experiment `{tags[EXPERIMENT_TAG]}` (`dvc exp show`)" if EXPERIMENT_TAG in tags else "") + usage
    )


def register(params: Params, paths: Paths) -> Registration:
    settings = params.register_
    metrics, unavailable = read_metrics(paths), read_unavailable(paths)
    gate = choose_gate(settings, metrics)
    if gate.metric not in metrics and gate.metric not in unavailable:
        raise ConfigError(
            f"register.gate_metric: {gate.metric!r} is not in {paths.metrics / EVAL_METRICS} "
            f"(available: {', '.join(sorted(metrics))})"
        )
    client = registry_client(params.register_, paths.root)
    model_hash = folder_hash(paths.sd_model)
    existing = _existing_version(client, settings.model_name, model_hash)
    version = existing or _log_new_version(params, paths, metrics, model_hash)
    if existing is None:
        client.set_registered_model_alias(settings.model_name, CHALLENGER, version.version)

    champion_version, champion_value = _champion_value(client, settings.model_name, gate.metric)
    value = metrics.get(gate.metric)
    is_champion = champion_version == int(version.version)
    refused = None if is_champion else untrusted_reason(gate, metrics, unavailable, settings)
    if refused is None and not is_champion and champion_version is not None and champion_value is None:
        refused = (f"champion version {champion_version} has no {gate.metric} to compare with (gated on other "
                   "data or another metric?): compare them and `sdpipe promote` by hand")
    promoted = refused is None and not is_champion and gate_passes(
        float(value), champion_value, gate.direction, settings.min_improvement)
    if promoted:
        move_champion(client, settings.model_name, int(version.version), reason=f"gate passed on {gate.metric}")
        champion_version = int(version.version)
    result = Registration(
        model_name=settings.model_name,
        version=int(version.version),
        model_hash=model_hash,
        promoted=promoted,
        champion_version=champion_version,
        gate_metric=gate.metric,
        gate_direction=gate.direction,
        gate_rule=gate.rule,
        gate_value=None if value is None else float(value),
        previous_champion_value=champion_value,
        refused=refused,
        reused_existing_version=existing is not None,
    )
    if not is_champion:
        _tag_gate(client, result)
    write_json(paths.metrics / REGISTRY_RECORD, asdict(result))
    if refused:
        log.warning("register: %s version %s not promoted: %s", settings.model_name, result.version, refused)
    log.info("register: %s version %s%s (gate: %s, %s)", settings.model_name, result.version,
             " promoted to champion" if promoted else f" (champion stays version {champion_version})",
             gate.metric, gate.rule)
    return result


def _tag_gate(client, result: Registration) -> None:
    """Which metric decided this version's promotion, how, and with what outcome (shown by `sdpipe models`)."""
    outcome = "promoted" if result.promoted else f"refused: {result.refused}" if result.refused else "not better"
    tags = {"metric": result.gate_metric, "direction": result.gate_direction, "rule": result.gate_rule,
            "outcome": outcome}
    for key, value in tags.items():
        client.set_model_version_tag(result.model_name, str(result.version), GATE_TAG_PREFIX + key, value)


