"""Defaults that learn faster: the whole default run (`dvc repro` of every stage, as `make run` does it) at
candidate params, side by side in one project, with each stage's seconds and the metrics the defaults must keep.

    .venv/bin/python bench/defaults.py                                   # the sweep below (SWEEP)
    .venv/bin/python bench/defaults.py --point "train.steps=800 train.learning_rate=0.002" --point "..."
    .venv/bin/python bench/defaults.py --until vae --point "vae.steps=2000 vae.batch_size=16"   # the VAE alone

One fresh copy of this repository (bench/project.py) runs the data stages once; then each point writes its
settings over params.yaml's and runs every later stage with `dvc repro -s STAGE`, timed by the wall clock
around the command (start-up, DVC's hashing and caching included). A stage DVC skips because nothing it
depends on changed since the point before counts the seconds of its last run, which had the same inputs. The
projected `dvc repro` of a fresh clone is the data stages' seconds plus each later stage's. A point keeps the
defaults' quality when metrics/eval.json's adherence (144 samples) is at least 0.97 and its noise MSE and VAE
PSNR are no worse than the old defaults' (REFERENCE). `--until STAGE` runs the later stages only up to STAGE
and reports the metrics those write (`--until vae`: the VAE's PSNR on the validation split, the figure
evaluate reports as vae_psnr). Results are printed as they come and written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from project import REPO, commit_of, dvc, new_project, set_params  # noqa: E402

DATA_STAGES = ("ingest", "validate", "preprocess")
MIN_ADHERENCE = 0.97
# The default run before the defaults changed (docs/explanation/results.md: 1,500 train steps, 1,000 VAE steps, both at
# learning rate 0.001; identical in every run since the layout move, 2026-12-02).
REFERENCE = {"noise_mse": 0.0395, "vae_psnr": 30.27}
VAE = {"vae.steps": 2000, "vae.batch_size": 16}  # the defaults since 2026-12-03
OLD_VAE = {"vae.steps": 1000, "vae.batch_size": 64}
# The points measured on 2026-12-03 and -04 (docs/explanation/results.md), in that order: fewer or smaller training batches lose
# adherence before they lose noise MSE; the VAE reconstructs better from more, smaller batches.
SWEEP: tuple[dict[str, object], ...] = (
    OLD_VAE,
    OLD_VAE | {"vae.steps": 500, "vae.learning_rate": 0.002, "train.steps": 800, "train.learning_rate": 0.002},
    OLD_VAE | {"vae.steps": 500, "vae.learning_rate": 0.002, "train.steps": 1000, "train.learning_rate": 0.002},
    VAE | {"train.batch_size": 32},
    VAE | {"train.steps": 1000, "train.learning_rate": 0.002},
    VAE,
    VAE | {"train.steps": 1250},
    VAE | {"train.steps": 1400},  # measured 2026-12-04
)
REPORTED = ("adherence", "adherence_std", "noise_mse", "vae_psnr", "vae_ssim")


def parse_point(text: str) -> dict[str, object]:
    """`key=value key=value` (values read as YAML) -> settings."""
    settings = {}
    for pair in text.split():
        key, separator, value = pair.partition("=")
        if not separator:
            raise SystemExit(f"--point {text!r}: {pair!r} is not key=value")
        settings[key] = yaml.safe_load(value)
    return settings


def model_stages(project: Path, until: str | None) -> list[str]:
    stages = [name for name in yaml.safe_load((project / "dvc.yaml").read_text())["stages"] if name not in DATA_STAGES]
    return stages[:stages.index(until) + 1] if until else stages


def timed_stage(project: Path, stage: str) -> tuple[float, bool]:
    seconds, output = dvc(project, "repro", "-s", stage)
    return seconds, bool(re.search(rf"Running stage '{stage}'", output))


def read_metrics(project: Path, stages: list[str]) -> dict:
    """What the stages run wrote: the VAE's PSNR and speed, train's speed, evaluate's REPORTED metrics."""
    def written(name: str) -> dict:
        return json.loads((project / "metrics" / f"{name}.json").read_text())

    vae = written("vae")
    metrics = dict(vae_psnr=vae["val_psnr"], vae_images_per_second=vae["images_per_second"])
    if "train" in stages:
        metrics["train_images_per_second"] = written("train")["images_per_second"]
    if "evaluate" in stages:
        metrics |= {name: written("eval")[name] for name in REPORTED}
    return metrics


def keeps_quality(metrics: dict) -> bool | None:
    """None: evaluate did not run (`--until`)."""
    if "adherence" not in metrics:
        return None
    return (metrics["adherence"] >= MIN_ADHERENCE and round(metrics["noise_mse"], 4) <= REFERENCE["noise_mse"]
            and round(metrics["vae_psnr"], 2) >= REFERENCE["vae_psnr"])


def measure_point(project: Path, defaults: str, point: dict, last_run: dict[str, float], until: str | None) -> dict:
    (project / "params.yaml").write_text(defaults)
    set_params(project, point)
    seconds, stages = {}, model_stages(project, until)
    for stage in stages:
        took, ran = timed_stage(project, stage)
        if ran:
            last_run[stage] = took
        seconds[stage] = last_run[stage]
    metrics = read_metrics(project, stages)
    return dict(point=point, seconds=seconds, metrics=metrics, keeps_quality=keeps_quality(metrics))


def table(results: dict) -> str:
    data_seconds = sum(results["data_seconds"].values())
    lines = ["| point | vae s | train s | other stages s | run, min | adherence | noise MSE | VAE PSNR | keeps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results["points"]:
        seconds, metrics = row["seconds"], row["metrics"]
        total = data_seconds + sum(seconds.values())
        other = total - seconds["vae"] - seconds.get("train", 0)
        name = " ".join(f"{key}={value}" for key, value in row["point"].items()) or "params.yaml"
        evaluated = "adherence" in metrics
        lines.append(
            f"| {name} | {seconds['vae']:.0f} | {seconds.get('train', 0):.0f} | {other:.0f} | {total / 60:.1f} | "
            + (f"{metrics['adherence']:.3f} ± {metrics['adherence_std']:.3f} | {metrics['noise_mse']:.4f}"
               if evaluated else "- | -")
            + f" | {metrics['vae_psnr']:.2f} | {({True: 'yes', False: 'no', None: '-'})[row['keeps_quality']]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", action="append", type=parse_point,
                        help='settings over params.yaml\'s, "key=value key=value" (repeatable; default: SWEEP)')
    parser.add_argument("--until", help="run the stages after the data stages only up to this one (e.g. vae)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "defaults.json")
    parser.add_argument("--root", type=Path, help="keep the project in this folder (default: temporary, deleted)")
    args = parser.parse_args()
    results = dict(commit=commit_of(REPO), cpus=os.cpu_count(), load_average=os.getloadavg(), reference=REFERENCE,
                   data_seconds={}, points=[])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdpipe-defaults-") as temporary:
        project = new_project((args.root or Path(temporary)) / "project", {})
        defaults = (project / "params.yaml").read_text()
        for stage in DATA_STAGES:
            results["data_seconds"][stage] = timed_stage(project, stage)[0]
        print(f"commit {results['commit']}, load {os.getloadavg()[0]:.1f}; data stages "
              f"{json.dumps(results['data_seconds'])}", flush=True)
        last_run: dict[str, float] = {}
        for point in args.point or SWEEP:
            results["points"].append(measure_point(project, defaults, point, last_run, args.until))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
            print(json.dumps(results["points"][-1]), flush=True)
    results.update(wall_seconds=time.perf_counter() - started, load_average_after=os.getloadavg())
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{table(results)}\nwall time {results['wall_seconds']:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
