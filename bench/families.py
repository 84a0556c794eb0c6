"""Model families side by side: each family's `tiny` model trained from scratch on the default synthetic set
(params.yaml's defaults otherwise), with its parameters, training images/s, CPU minutes, steps and adherence
(evaluate's samples: max_prompts x samples_per_prompt x stability_repeats, 144 by default).

    python bench/families.py                      # every family; docs/guides/model-families.md has the table
    python bench/families.py --family flux        # one family (repeatable)
    python bench/families.py --smoke              # a few steps and samples per family: the bench runs, no figures
    python bench/families.py --family sd3 --steps 3000   # one point instead of the sweep (--learning-rate too)
    python bench/families.py --family zimage --set train.flow.shift=1.0   # any params.yaml key, for every run

A family's runs try the sweep in order (params.yaml's steps and learning rate first) and stop at the first that
reaches adherence 0.9. The data (ingest, preprocess) is made once; the VAE is trained once per latent layout
(4 channels for sd and sdxl; 16 with a fitted shift for sd3 and flux) and encoded once; each run trains in a
folder of its own. Great Expectations validation is skipped (every synthetic render is valid), and nothing is
logged to MLflow (`tracked=False`). CPU minutes are this process's CPU time while training (all its threads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]  # runs from a plain copy of the repo

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from pipeline.contracts.data import MANIFEST  # noqa: E402
from pipeline.contracts.paths import Paths  # noqa: E402
from pipeline.core.config import FAMILIES, FAMILY_DECLARATIONS, Params, latent_channels_of  # noqa: E402
from pipeline.core.params_file import parse_params  # noqa: E402

TARGET = 0.9
Sweep = tuple[tuple[int | None, float | None], ...]  # (train.steps, train.learning_rate); None: params.yaml's
SWEEP: Sweep = ((None, None), (3000, None), (3000, 5e-4))
SMOKE = {"ingest": {"synthetic": {"count": 96}}, "vae": {"steps": 3}, "train": {"steps": 3, "validation_samples": 8},
         "evaluate": {"max_prompts": 2, "samples_per_prompt": 1, "stability_repeats": 1, "num_inference_steps": 2}}


def merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def bench_params(family: str, smoke: bool, steps: int | None = None, learning_rate: float | None = None,
                 overrides: dict | None = None) -> Params:
    raw = merged(merged(yaml.safe_load((REPO / "params.yaml").read_text()), SMOKE if smoke else {}), overrides or {})
    raw["model"]["family"] = family
    raw["train"].update(sample_every=0, **({"steps": steps} if steps else {}),
                        **({"learning_rate": learning_rate} if learning_rate else {}))
    raw["train"].update(checkpoint_every=raw["train"]["steps"], validate_every=raw["train"]["steps"])
    return parse_params(raw)


def prepare_data(params: Params, root: Path) -> Paths:
    from pipeline.stages.ingest import ingest
    from pipeline.stages.preprocess import preprocess

    paths = Paths(root / "data-project")
    if not (paths.processed / "train" / MANIFEST).is_file():
        ingest(params.ingest, paths)
        paths.validated.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths.raw / MANIFEST, paths.validated / MANIFEST)
        preprocess(params.preprocess, paths)
    return paths


def encoded_project(params: Params, root: Path, data: Paths) -> Paths:
    """A project with the VAE of this family's latent layout trained and the data encoded (shared by its runs)."""
    from pipeline.stages.encode import encode
    from pipeline.stages.vae import vae_stage

    family = params.model.family
    layout = f"vae-{latent_channels_of(params.vae, family)}{'-shifted' if FAMILY_DECLARATIONS[family].latents_shifted else ''}"
    paths = Paths(root / layout)
    if not (paths.latents / "train.parquet").is_file():
        (paths.root / "data").mkdir(parents=True, exist_ok=True)
        if not paths.processed.exists():
            paths.processed.symlink_to(data.processed)
        vae_stage(paths, vae=params.vae, model=params.model, preprocess=params.preprocess)
        encode(paths, encode=params.encode, model=params.model)
    return paths


def run_folder(shared: Paths, name: str) -> Paths:
    folder = shared.root.parent / "runs" / name
    (folder / "models").mkdir(parents=True, exist_ok=True)
    for link in ("data", "models/vae"):
        if not (folder / link).exists():
            (folder / link).symlink_to(shared.root / link)
    return Paths(folder)


def adherence(params: Params, paths: Paths, data: Paths) -> dict:
    """Adherence as evaluate measures it: its prompts, samples and seed sets, read by the shape reader (with its
    colour and shape halves: which one a family misses)."""
    from pipeline.diffusion.families import load_pipeline
    from pipeline.evaluation.prompts import evaluation_prompts
    from pipeline.evaluation.shape_adherence import shape_adherence_metrics
    from pipeline.stages.evaluate import generate_samples

    pipeline = load_pipeline(paths.sd_model)
    val_captions = pd.read_parquet(data.processed / "val" / MANIFEST, columns=["caption"])["caption"]
    prompts = evaluation_prompts(params.evaluate, params.ingest.source, val_captions, paths.root)
    runs = [shape_adherence_metrics(generate_samples(pipeline, prompts, params.evaluate, repeat), prompts)
            for repeat in range(params.evaluate.stability_repeats)]
    mean = {key: sum(run[key] for run in runs) / len(runs) for key in ("adherence", "colour_accuracy", "shape_accuracy")}
    return dict(mean, adherence_samples=sum(run["adherence_samples"] for run in runs))


def override(setting: str) -> dict:
    """`train.flow.shift=1.0` as {"train": {"flow": {"shift": 1.0}}} (the value read as YAML)."""
    key, separator, value = setting.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"{setting!r}: expected KEY=VALUE, like train.flow.shift=1.0")
    nested = yaml.safe_load(value)
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def measure_family(family: str, root: Path, smoke: bool, sweep: Sweep, overrides: dict | None = None) -> list[dict]:
    from pipeline.stages.train import train

    results = []
    settings = json.dumps(overrides, sort_keys=True) if overrides else ""
    label = f"-{hashlib.sha256(settings.encode()).hexdigest()[:8]}" if overrides else ""  # runs of other settings
    for steps, learning_rate in (sweep[:1] if smoke else sweep):
        params = bench_params(family, smoke, steps, learning_rate, overrides)
        data = prepare_data(params, root)
        shared = encoded_project(params, root, data)
        paths = run_folder(shared, f"{family}-{params.train.steps}-{params.train.learning_rate:g}{label}")
        cpu, wall = time.process_time(), time.perf_counter()
        metrics = train(params, paths, tracked=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        result = dict(family=family, steps=params.train.steps, learning_rate=params.train.learning_rate,
                      settings=settings,
                      parameters=metrics["trainable_parameters"], images_per_second=metrics["images_per_second"],
                      cpu_minutes=cpu / 60, wall_minutes=wall / 60, **adherence(params, paths, data))
        print(json.dumps(result), flush=True)
        results.append(result)
        if result["adherence"] >= TARGET:
            break
    return results


def table(results: list[dict]) -> str:
    lines = ["| family | parameters | steps | learning rate | images/s | CPU minutes | adherence (samples) | --set |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for result in results:
        lines.append(f"| {result['family']} | {result['parameters'] / 1e6:.1f} M | {result['steps']} | "
                     f"{result['learning_rate']:g} | {result['images_per_second']:.0f} | {result['cpu_minutes']:.1f} | "
                     f"{result['adherence']:.3f} ({result['adherence_samples']}) | {result['settings']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only this family (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="a few steps and samples: checks the bench runs")
    parser.add_argument("--root", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("families-bench.json"), help="results, written as they come")
    parser.add_argument("--steps", type=int, help="one run at these train.steps instead of the sweep")
    parser.add_argument("--learning-rate", type=float, help="one run at this train.learning_rate instead of the sweep")
    parser.add_argument("--set", type=override, action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml setting for every run, e.g. train.flow.shift=1.0 (repeatable)")
    args = parser.parse_args()
    overrides = {}
    for setting in args.set:
        overrides = merged(overrides, setting)
    root = args.root or Path(tempfile.mkdtemp(prefix="sdpipe-families-bench-"))
    sweep = ((args.steps, args.learning_rate),) if args.steps or args.learning_rate else SWEEP
    results = []
    for family in args.family or FAMILIES:
        results += measure_family(family, root, args.smoke, sweep, overrides)
        args.out.write_text(json.dumps(results, indent=2))
    print("\n" + table(results))


if __name__ == "__main__":
    main()
