"""Monitoring: check each new batch, and decide with reasons whether to retrain.

A batch is a folder under `monitor.incoming` (data/incoming/ by default) with images and a
`metadata.jsonl` of `{"file_name": ..., "text": caption}` lines (the Hugging Face imagefolder layout).
`check_batch` validates it with the same Great Expectations suite as the `validate` stage, computes
drift against the training set's reference features (`pipeline.quality.drift`: PSI and KS per feature, MMD on
the champion VAE's latents) and evaluates the champion on it (noise-prediction MSE at the fixed
timesteps, against the champion's own validation MSE). `decide` turns the reports of every batch not
yet trained on into a decision and the reasons for it. Batches are read, never modified.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contracts.data import MANIFEST, REFERENCE_FEATURES, STATS
from pipeline.contracts.paths import Paths
from pipeline.contracts.records import METRIC_TAG_PREFIX
from pipeline.contracts.shards import image_bytes
from pipeline.core.atomic import atomic_dir, read_json
from pipeline.core.config import MonitorParams, Params
from pipeline.core.errors import InputError
from pipeline.data.captions import normalise_caption
from pipeline.data.images import content_id, describe_image, load_training_image
from pipeline.data.sources import path_inside
from pipeline.data.sources.tables import read_rows
from pipeline.quality.drift_features import feature_table
from pipeline.quality.manifest_checks import ImageFiles, check_manifest, failed_hard_checks

log = logging.getLogger(__name__)

BATCH_METADATA = "metadata.jsonl"
HISTORY = "history.jsonl"
UNREADABLE = "unreadable"
MONITORING_TAG = "sdpipe.monitoring"
BATCH_SERIES = "valid_share"  # every checked batch logs it: its history's length counts the batches


def batch_manifest(folder: Path) -> pd.DataFrame:
    """The batch as manifest rows (paths relative to the batch folder), headers read, pixels not decoded."""
    metadata = folder / BATCH_METADATA
    if not metadata.is_file():
        raise InputError(f"{folder}: a batch needs {BATCH_METADATA} with file_name and text per line")
    rows = []
    for number, entry in enumerate(read_rows(metadata), start=1):
        if "file_name" not in entry:
            raise InputError(f"{metadata}: row {number} has no file_name")
        name, caption = entry["file_name"], entry.get("text", "")
        path = path_inside(folder, folder / name)  # a name with ../ must not read outside the batch
        data = path.read_bytes() if path is not None and path.is_file() else b""
        try:
            width, height, fmt = describe_image(data)
        except Exception:  # unreadable or missing: validation quarantines it as not decodable
            width, height, fmt = 0, 0, UNREADABLE
        rows.append(dict(id=content_id(data), path=name, caption=caption, width=width, height=height,
                         format=fmt, bytes=len(data), source=folder.name))
    return pd.DataFrame(rows)


def pending_batches(params: MonitorParams, paths: Paths) -> list[Path]:
    """Batch folders in `incoming` that no retraining has merged yet, oldest name first."""
    incoming = paths.resolve(params.incoming)
    if not incoming.is_dir():
        return []
    merged = {folder.name for folder in paths.batches.iterdir()} if paths.batches.is_dir() else set()
    return sorted(f for f in incoming.iterdir() if f.is_dir() and not f.name.startswith(".") and f.name not in merged)


@dataclass
class BatchReport:
    batch: str
    samples: int
    valid: int
    validation: dict
    features: dict = field(default_factory=dict)
    drifted_features: list[str] = field(default_factory=list)
    mmd: dict = field(default_factory=dict)
    champion: dict = field(default_factory=dict)

    @property
    def latents_drifted(self) -> bool:
        return bool(self.mmd) and self.mmd["drifted"]

    @property
    def failed_checks(self) -> dict[str, str]:
        """The hard checks the batch failed (a broken upload), each with what was observed."""
        return failed_hard_checks(self.validation) if self.validation else {}


def _sample_reference(paths: Paths, count: int, seed: int, resolution: int) -> np.ndarray:
    """Up to `count` training images, processed exactly as `check_batch` processes a batch.

    They are decoded from data/raw and centre-cropped to squares at `resolution`, as the batch images are,
    rather than read from data/processed: there train images may be random crops or, with
    preprocess.bucketing, not square, and an MMD test between differently processed samples measures the
    processing, not the data. (The val split is square, but it is not what the model trained on, may be
    random crops too, and is often smaller than `count`.) With centre crops and no bucketing these are the
    pixels of data/processed/train.
    """
    ids = pd.read_parquet(paths.processed / "train" / MANIFEST, columns=["id"])["id"]
    positions = np.random.default_rng(seed).choice(len(ids), size=min(count, len(ids)), replace=False)
    chosen = ids.iloc[np.sort(positions)]
    raw = pd.read_parquet(paths.validated / MANIFEST, columns=["id", "shard"]).set_index("id")
    missing = sorted(set(chosen) - set(raw.index))
    if missing:
        raise InputError(f"{paths.validated / MANIFEST}: no row for training sample {missing[0]} of data/processed "
                         f"({len(missing)} missing); re-run preprocess (dvc repro preprocess)")
    images = image_bytes(paths.raw, raw.loc[chosen].reset_index())
    return np.stack([np.asarray(load_training_image(io.BytesIO(data), resolution)) for data in images])


def check_batch(folder: Path, params: Params, paths: Paths, champion_folder: Path, champion_noise_mse: float) -> BatchReport:
    # torch and diffusers load here only: `sdpipe pending-batches`, `decide` and `merge-batches`, each a process
    # of the retraining flow, start in under a second without them instead of about 8
    import torch

    from pipeline.diffusion.families import load_pipeline
    from pipeline.diffusion.vae_io import encode_images, to_model_range
    from pipeline.evaluation.noise_metrics import noise_metrics_on
    from pipeline.quality.drift import feature_drift, mmd_test

    settings = params.monitor
    manifest = batch_manifest(folder)
    validation = check_manifest(manifest, ImageFiles(folder), params.validate_)
    good = validation.good.assign(caption=lambda rows: [
        normalise_caption(caption, lowercase=params.preprocess.lowercase_captions) for caption in rows["caption"]])
    report = BatchReport(batch=folder.name, samples=len(manifest), valid=len(good), validation=validation.summary)
    if good.empty:
        return report
    resolution = params.preprocess.resolution
    images = np.stack([np.asarray(load_training_image(folder / path, resolution)) for path in good["path"]])
    stats = read_json(paths.processed / STATS)
    features = feature_table(images, list(zip(good["width"], good["height"], strict=True)),
                             good["caption"].tolist(), set(stats["vocabulary"]))
    report.features = feature_drift(pd.read_parquet(paths.processed / REFERENCE_FEATURES), features)
    report.drifted_features = [
        name for name, test in report.features.items()
        if test["psi"] > settings.psi_threshold and test["ks_pvalue"] < settings.ks_alpha
    ]
    champion = load_pipeline(champion_folder)
    with torch.no_grad():
        batch_latents, _ = encode_images(champion.vae, to_model_range(images), batch_size=256)
        reference = _sample_reference(paths, settings.reference_samples, settings.seed, resolution)
        reference_latents, _ = encode_images(champion.vae, to_model_range(reference), batch_size=256)
    mmd = mmd_test(reference_latents.numpy(), batch_latents.numpy(),
                   permutations=settings.mmd_permutations, seed=settings.seed)
    report.mmd = dict(mmd2=mmd.mmd2, pvalue=mmd.pvalue, drifted=mmd.pvalue < settings.mmd_alpha)
    batch_mse = noise_metrics_on(champion, batch_latents, good["caption"].tolist(), params.evaluate.timesteps,
                                 params.evaluate.noise_seed)["noise_mse"]
    report.champion = dict(noise_mse_batch=batch_mse, noise_mse_validation=champion_noise_mse,
                           degradation=batch_mse / champion_noise_mse - 1)
    return report


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reasons: list[str]
    new_samples: int


def decide(reports: list[BatchReport], params: MonitorParams) -> Decision:
    """Retrain when enough valid new data has arrived and it drifted or the champion got worse on it.
    A batch that failed a hard check counts for nothing: merge_batches leaves it out too."""
    excluded = [f"{report.batch}: left out, it failed the hard checks: "
                + "; ".join(f"{name}: observed {observed}" for name, observed in report.failed_checks.items())
                for report in reports if report.failed_checks]
    reports = [report for report in reports if not report.failed_checks]
    new_samples = sum(report.valid for report in reports)
    triggers = []
    for report in reports:
        if report.drifted_features:
            details = ", ".join(
                f"{name} (PSI {report.features[name]['psi']:.2f}, KS p {report.features[name]['ks_pvalue']:.1e})"
                for name in report.drifted_features
            )
            triggers.append(f"{report.batch}: features drifted: {details}")
        if report.latents_drifted:
            triggers.append(f"{report.batch}: VAE latents drifted (MMD p {report.mmd['pvalue']:.3f} "
                            f"< monitor.mmd_alpha {params.mmd_alpha})")
        if report.champion and report.champion["degradation"] > params.max_degradation:
            triggers.append(f"{report.batch}: champion noise MSE {report.champion['noise_mse_batch']:.4f} is "
                            f"{report.champion['degradation']:.0%} above its validation MSE "
                            f"(> monitor.max_degradation {params.max_degradation:.0%})")
    enough = new_samples >= params.min_new_samples
    volume = (f"{new_samples} valid new samples in {len(reports)} pending batches "
              f"({'>=' if enough else '<'} monitor.min_new_samples {params.min_new_samples})")
    if not triggers:
        return Decision(False, [volume, *excluded, "no drift and the champion is within monitor.max_degradation"],
                        new_samples)
    if not enough:
        return Decision(False, [volume, *excluded, *triggers, "waiting for more data before retraining"], new_samples)
    return Decision(True, [volume, *excluded, *triggers], new_samples)


def record(paths: Paths, reports: list[BatchReport], decision: Decision) -> None:
    """Append the check to data/monitoring/history.jsonl (one JSON line per decision)."""
    paths.monitoring.mkdir(parents=True, exist_ok=True)
    entry = dict(at=datetime.now(UTC).isoformat(), decision=asdict(decision), reports=[asdict(r) for r in reports])
    with (paths.monitoring / HISTORY).open("a", encoding="utf-8") as history:
        history.write(json.dumps(entry) + "\n")


def merge_batches(folders: list[Path], params: Params, paths: Paths) -> int:
    """Copy each batch's valid samples into data/batches/<batch>/ (read by `ingest`); returns samples merged.
    A batch that fails a hard check (a broken upload) is left out and stays pending in `incoming`."""
    merged = 0
    for folder in folders:
        check = check_manifest(batch_manifest(folder), ImageFiles(folder), params.validate_)
        failed = failed_hard_checks(check.summary)
        if failed:
            log.warning("monitor: %s left out, it failed the hard checks: %s", folder.name, "; ".join(failed))
            continue
        good = check.good
        with atomic_dir(paths.batches / folder.name) as staging:
            lines = []
            for path, caption in zip(good["path"], good["caption"], strict=True):
                (staging / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / path, staging / path)
                lines.append(json.dumps({"file_name": path, "text": caption}))
            (staging / BATCH_METADATA).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        merged += len(good)
        log.info("monitor: merged %d samples of %s into %s", len(good), folder.name, paths.batches)
    return merged


def champion_reference(params: Params, paths: Paths) -> tuple[Path, float, int]:
    """The champion's diffusers folder, its validation noise MSE and its version."""
    from pipeline.tracking.champion import require_champion
    from pipeline.tracking.model_source import resolve_model
    from pipeline.tracking.runs import registry_client

    name = params.register_.model_name
    version = require_champion(registry_client(params.register_, paths.root), name)
    folder = resolve_model(f"models:/{name}/{version.version}", params.register_, paths)
    return folder, float(version.tags[METRIC_TAG_PREFIX + "noise_mse"]), int(version.version)


def log_monitoring(params: Params, paths: Paths, reports: list[BatchReport], decision: Decision) -> str:
    """One long-lived MLflow run per project holds the monitoring time series; returns its id.

    The batch measurements are a series with one step per batch checked (the run's tag `batch.<step>` names
    the batch); `retrain` and `new_samples` are logged once per decision, at its last batch's step."""
    import mlflow

    from pipeline.tracking.runs import use_experiment

    use_experiment(params.register_, paths.root)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.register_.experiment)
    found = client.search_runs([experiment.experiment_id], f"tags.{MONITORING_TAG} = 'true'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        experiment.experiment_id, run_name="monitoring", tags={MONITORING_TAG: "true"}).info.run_id
    first = len(client.get_metric_history(run_id, BATCH_SERIES))
    timestamp = int(datetime.now(UTC).timestamp() * 1000)
    entries, tags = [], []
    for step, report in enumerate(reports, start=first):
        entries += [mlflow.entities.Metric(k, v, timestamp, step) for k, v in batch_metrics(report).items()]
        tags.append(mlflow.entities.RunTag(f"batch.{step}", report.batch))
    last = first + max(len(reports) - 1, 0)
    entries += [mlflow.entities.Metric("retrain", float(decision.retrain), timestamp, last),
                mlflow.entities.Metric("new_samples", float(decision.new_samples), timestamp, last)]
    client.log_batch(run_id, metrics=entries, tags=tags)
    return run_id


def batch_metrics(report: BatchReport) -> dict[str, float]:
    """One batch's measurements as monitoring metrics."""
    metrics = {BATCH_SERIES: report.valid / report.samples if report.samples else 0.0,
               "hard_checks_failed": float(len(report.failed_checks))}
    metrics.update({f"psi_{name}": test["psi"] for name, test in report.features.items()})
    if report.mmd:
        metrics.update(mmd2=report.mmd["mmd2"], mmd_pvalue=report.mmd["pvalue"])
    if report.champion:
        metrics.update(champion_noise_mse=report.champion["noise_mse_batch"],
                       champion_degradation=report.champion["degradation"])
    return metrics


SHIFTS: dict[str, dict] = {
    "none": {},
    "colour": dict(colours={"purple": (140, 40, 180), "orange": (245, 130, 20)}),
    "background": dict(background=(20, 70)),
}


def drop_demo_batch(params: Params, paths: Paths, *, shift: str, count: int, seed: int) -> Path:
    """Write a batch of synthetic shapes into `incoming`: from the training distribution (`none`),
    with colours it never saw (`colour`) or on a dark background (`background`)."""
    from pipeline.data import shapes

    if shift not in SHIFTS:
        raise InputError(f"--shift {shift!r}: choose one of {', '.join(SHIFTS)}")
    settings = params.ingest.synthetic
    target = paths.resolve(params.monitor.incoming) / f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{shift}-seed{seed}"
    with atomic_dir(target) as staging:
        lines = []
        for index, sample in enumerate(shapes.render_samples(
            count=count, resolution=settings.resolution, seed=seed, min_size=settings.min_size,
            max_size=settings.max_size, **SHIFTS[shift],
        )):
            name = f"{index:05d}.png"
            (staging / name).write_bytes(sample.png)
            lines.append(json.dumps({"file_name": name, "text": sample.caption}))
        (staging / BATCH_METADATA).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return target
