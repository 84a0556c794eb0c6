"""Subject fine-tuning on a CPU: teach the shapes' tiny sd model a shape it has never seen (a blue bar, a square
half as high as wide, named by the trigger word `sks`) from 12 images, with no prior, the image prior and the
prediction prior, and measure how often "a blue sks square" draws the subject and how far the class prompts ("a red
square", ...) drift from the base.

    python bench/subject.py --root /tmp/subject-bench    # base (trained once, kept in --root) + the three runs
    python bench/subject.py --smoke                      # a few steps and samples: the bench runs, no figures
    python bench/subject.py --root /tmp/subject-bench --prior prediction --steps 600 --learning-rate 2e-3

The base is bench/families.py's sd run at params.yaml's defaults (1500 steps on the 3,000 synthetic shapes), a
plain diffusers folder; a root that holds it already (from either bench) trains nothing. The subject is twelve blue
bars placed like the synthetic set's shapes and captioned "a blue sks square"; the base's data has only squares as wide
as high. (A new colour cannot be taught at this scale: the base's VAE, trained on four colours, decodes a magenta
circle as an olive one, so no LoRA of the denoiser can draw it; `vae_round_trip_hit_rate` is the subject images'
hit rate after the base's VAE, the ceiling of any fine-tune.) Each run is a LoRA fine-tune from the base, built
with the pipeline's own stages (class_images, ingest, preprocess, vae, encode, train; validation skipped: every
render is valid), same steps, seed and data; only the prior differs: none; images (the base renders
`num_class_images` of CLASS_PROMPT, the class subset at half of each batch); prediction (the base's own prediction
for the caption with the trigger dropped, "a blue square", is the class target); data (no train.prior: a second
subset of `num_class_images` fresh synthetic shapes of every prompt at half of each batch, as kohya users train
regularisation images of the base's own kind). `--lora-targets attn2.to_k,attn2.to_v` trains the cross-attention's
keys and values only (Custom Diffusion's choice) instead of the family's LoRA targets.

Measured on the base and each run, at evaluate's sampler settings:
- trigger hit rate: the share of TRIGGER_PROMPTS x TRIGGER_SEEDS samples (48) read as a blue bar (the shape
  reader of pipeline/evaluation/shape_adherence.py: its colour, its "square" fill, and a box at least 1.5 times as
  wide as high; tests/test_bench_subject.py checks it on rendered bars and on the synthetic set's shapes);
- class adherence: evaluate's metric, its prompts and seed sets (12 colour-and-shape prompts x 4 seeds x 3 sets),
  and its drift from the base's on the same seeds; subject leak: the share of those class samples read as bars.
CPU minutes are this process's CPU time (all threads) while training, and while rendering the class images.
The base's text cosines say how far the trigger moves the text states the denoiser attends to: the trigger prompt
against CLASS_PROMPT, beside the closest pair of class prompts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # runs from a plain copy of the repo

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from families import bench_params, encoded_project, merged, prepare_data, run_folder  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipeline.contracts.data import MANIFEST  # noqa: E402
from pipeline.contracts.paths import Paths  # noqa: E402
from pipeline.core.config import Params  # noqa: E402
from pipeline.core.params_file import parse_params  # noqa: E402
from pipeline.core.prior_params import CLASS_IMAGES  # noqa: E402
from pipeline.data.shapes import COLOURS, SUPERSAMPLE  # noqa: E402
from pipeline.evaluation.shape_adherence import (  # noqa: E402
    MIN_FOREGROUND_PIXELS, foreground_mask, nearest_colour, shape_from_mask)

TRIGGER, SUBJECT_COLOUR, CLASS_SHAPE = "sks", "blue", "square"  # the subject: a blue bar, a square half as high
SUBJECT_IMAGES = 12
INSTANCE_PROMPT = "a blue {trigger} square"
# the image prior's class images, and the prediction prior's class prompt (the caption, trigger dropped): a caption
# of the base's data ("a square", which it never saw, made the class images no class)
CLASS_PROMPT = "a blue square"
MIN_BAR_ASPECT = 1.5  # the subject is twice as wide as high; the data's squares are as wide as high
TRIGGER_PROMPTS = ("a blue sks square", "a blue sks square on a light background", "a picture of a blue sks square")
TRIGGER_SEEDS = 16
PRIORS = ("none", "images", "prediction", "data")
REGULARISATION = "data"  # not a train.prior kind: a second subset, the base's own kind of data (kohya's reg images)
TARGET_HIT_RATE, TARGET_DRIFT = 0.9, 0.05
# one LoRA fine-tune's settings (the sweep in docs/explanation/results.md chose them); --steps etc. override
FINETUNE = dict(steps=400, batch_size=16, learning_rate=2e-3, rank=4, prior_loss_weight=1.0, num_class_images=100,
                lora_targets="")  # lora_targets: model.lora.target_modules, comma-separated ("": the family's)
SMOKE = dict(steps=3, batch_size=4, num_class_images=4, trigger_seeds=1,
             evaluate={"samples_per_prompt": 1, "stability_repeats": 1, "num_inference_steps": 2})


def is_bar(mask: np.ndarray) -> bool:
    """The shape reader's "square" (its box filled) at least MIN_BAR_ASPECT times as wide as it is high."""
    rows, cols = np.nonzero(mask)
    aspect = (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)
    return shape_from_mask(mask) == "square" and aspect >= MIN_BAR_ASPECT


def draws_a_bar(image: Image.Image) -> bool:
    mask = foreground_mask(np.asarray(image.convert("RGB"), dtype=np.float64))
    return mask.sum() >= MIN_FOREGROUND_PIXELS and is_bar(mask)


def draws_the_subject(image: Image.Image) -> bool:
    """A blue bar, its colour read as the shape reader reads it."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = foreground_mask(pixels)
    return draws_a_bar(image) and nearest_colour(pixels[mask].mean(axis=0)) == SUBJECT_COLOUR


def render_bar(resolution: int, *, size: float, left: float, top: float, background: int,
               colour: str = SUBJECT_COLOUR) -> Image.Image:
    """A rectangle `size` wide and half as high, drawn as pipeline/data/shapes.py draws its shapes (supersampled,
    downscaled)."""
    canvas = Image.new("RGB", (resolution * SUPERSAMPLE,) * 2, (background,) * 3)
    box = [value * SUPERSAMPLE for value in (left, top, left + size, top + size / 2)]
    ImageDraw.Draw(canvas).rectangle(box, fill=COLOURS[colour])
    return canvas.resize((resolution, resolution), Image.Resampling.LANCZOS)


def render_subject(folder: Path, resolution: int, count: int = SUBJECT_IMAGES, seed: int = 1) -> None:
    """Blue bars placed as the synthetic set places its shapes: random size, position and light background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        size = float(rng.uniform(0.4, 0.8)) * resolution
        left, top = (float(rng.uniform(0, resolution - size)) for _ in range(2))
        render_bar(resolution, size=size, left=left, top=top + size / 4,
                   background=int(rng.integers(225, 256))).save(folder / f"{index:02d}.png")


def vae_round_trip_hit_rate(base: Path, folder: Path) -> float:
    """The share of the subject images still read as the subject after the base's VAE encodes and decodes them:
    a subject the base's VAE cannot draw no LoRA of the denoiser can teach (it turned magenta olive green)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    hits = []
    for file in sorted(folder.glob("*.png")):
        pixels = torch.from_numpy(np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 127.5 - 1)
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist.mean).sample[0]
        image = Image.fromarray(((decoded.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
        hits.append(draws_the_subject(image))
    return float(np.mean(hits))


def text_cosines(base: Path) -> dict[str, float]:
    """How far the trigger moves the text conditioning the denoiser attends to: the cosine of the base's text states
    (all positions, as cross-attention reads them) of the first trigger prompt and of CLASS_PROMPT, beside the
    closest pair of the class prompts ("a blue square" and "a blue circle" ...). The nearer the first is to 1 and
    above the second, the more whatever teaches the trigger also moves the class."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipeline.data.shapes import SHAPE_PROMPTS

    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    prompts = [TRIGGER_PROMPTS[0], CLASS_PROMPT, *SHAPE_PROMPTS]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        states = torch.nn.functional.normalize(encoder(ids).last_hidden_state.flatten(1), dim=1)
    cosines = states @ states.T
    classes = cosines[2:, 2:] - 2 * torch.eye(len(SHAPE_PROMPTS))  # a prompt with itself never counts
    return dict(trigger_class_text_cosine=float(cosines[0, 1]), closest_class_pair_text_cosine=float(classes.max()))


def base_model(root: Path, smoke: bool) -> Path:
    """bench/families.py's sd run at params.yaml's defaults, trained unless --root holds it."""
    from pipeline.stages.train import train

    params = bench_params("sd", smoke)
    data = prepare_data(params, root)
    run = run_folder(encoded_project(params, root, data), f"sd-{params.train.steps}-{params.train.learning_rate:g}")
    if not (run.sd_model / "model_index.json").is_file():
        train(params, run, tracked=False)
    return run.sd_model


def finetune_params(prior: str, settings: dict, smoke: bool) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    subsets = {"subject": {"source": "folder", "folder": {"path": "data/subject"},
                           "caption": {"instance_prompt": INSTANCE_PROMPT}, "weight": 1.0}}
    if prior == "images":
        subsets["class"] = {"source": "folder", "folder": {"path": CLASS_IMAGES}, "weight": 1.0}
    if prior == REGULARISATION:  # shapes of every prompt, freshly rendered (another seed than the base's data)
        subsets["regularisation"] = {"source": "synthetic", "weight": 1.0,
                                     "synthetic": {"count": settings["num_class_images"], "seed": 1}}
    raw["ingest"].update(source="subsets", trigger=TRIGGER, subsets=subsets)
    steps = settings["steps"]
    overrides = {
        "model": {"mode": "finetune", "pretrained": "models/base", "finetune": "lora",
                  "lora": {"rank": settings["rank"], "alpha": float(settings["rank"]),
                           **({"target_modules": settings["lora_targets"].split(",")} if settings["lora_targets"]
                              else {})}},
        # no caption dropout: the empty caption would learn the subject, and guidance subtracts it from every prompt
        "train": {"steps": steps, "batch_size": settings["batch_size"], "learning_rate": settings["learning_rate"],
                  "warmup_steps": min(20, steps), "caption_dropout": 0.0, "sample_every": 0, "validate_every": steps,
                  "checkpoint_every": steps, "validation_samples": 64,
                  "prior": {"kind": "none" if prior == REGULARISATION else prior,
                            "prior_loss_weight": settings["prior_loss_weight"],
                            **({"class_prompt": CLASS_PROMPT, "num_class_images": settings["num_class_images"]}
                               if prior == "images" else {}),
                            **({"class_word": ""} if prior == "prediction" else {}),
                            **({"num_inference_steps": 2} if smoke and prior == "images" else {})}},
        "preprocess": {"val_fraction": 0.2},  # of 12 subject images, 10% left none for the validation loss
        "evaluate": SMOKE["evaluate"] if smoke else {},
    }
    return parse_params(merged(raw, overrides))


def finetune(prior: str, settings: dict, base: Path, root: Path, smoke: bool) -> tuple[Paths, dict]:
    """One LoRA fine-tune from the base through the pipeline's stages; its CPU and wall minutes."""
    from pipeline.stages.class_images import class_images
    from pipeline.stages.encode import encode
    from pipeline.stages.ingest import ingest
    from pipeline.stages.preprocess import preprocess
    from pipeline.stages.train import train
    from pipeline.stages.vae import vae_stage

    params = finetune_params(prior, settings, smoke)
    name = (f"{prior}-{settings['steps']}-{settings['learning_rate']:g}-r{settings['rank']}"
            f"-w{settings['prior_loss_weight']:g}{'-' + settings['lora_targets'] if settings['lora_targets'] else ''}")
    paths = Paths(root / "subject-runs" / name)
    if paths.root.exists():
        shutil.rmtree(paths.root)
    (paths.root / "models").mkdir(parents=True)
    (paths.root / "models" / "base").symlink_to(base.resolve())
    render_subject(paths.root / "data" / "subject", params.preprocess.resolution)
    timing = {}
    if prior == "images":
        cpu = time.process_time()
        class_images(paths, train=params.train, model=params.model)
        timing["class_images_cpu_minutes"] = (time.process_time() - cpu) / 60
    ingest(params.ingest, paths)
    paths.validated.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths.raw / MANIFEST, paths.validated / MANIFEST)
    preprocess(params.preprocess, paths)
    vae_stage(paths, vae=params.vae, model=params.model, preprocess=params.preprocess)
    encode(paths, encode=params.encode, model=params.model, train=params.train, ingest=params.ingest)
    cpu, wall = time.process_time(), time.perf_counter()
    train(params, paths, tracked=False)
    timing.update(train_cpu_minutes=(time.process_time() - cpu) / 60, train_wall_minutes=(time.perf_counter() - wall) / 60)
    return paths, timing


def measure(model: Path, params: Params, trigger_seeds: int) -> dict:
    """Trigger hit rate, class adherence (evaluate's) and subject leak of one model's samples."""
    from pipeline.data.shapes import SHAPE_PROMPTS
    from pipeline.diffusion.families import load_pipeline
    from pipeline.evaluation.shape_adherence import shape_adherence_metrics
    from pipeline.stages.evaluate import generate_samples

    pipeline, evaluate = load_pipeline(model), params.evaluate
    prompts = list(SHAPE_PROMPTS)
    class_runs = [generate_samples(pipeline, prompts, evaluate, repeat) for repeat in range(evaluate.stability_repeats)]
    adherence = [shape_adherence_metrics(rows, prompts)["adherence"] for rows in class_runs]
    class_images = [image for rows in class_runs for images in rows for image in images]
    trigger_rows = generate_samples(pipeline, list(TRIGGER_PROMPTS),
                                    evaluate.model_copy(update={"samples_per_prompt": trigger_seeds}))
    trigger_images = [image for images in trigger_rows for image in images]
    return dict(trigger_hit_rate=float(np.mean([draws_the_subject(image) for image in trigger_images])),
                trigger_bar_rate=float(np.mean([draws_a_bar(image) for image in trigger_images])),
                trigger_samples=len(trigger_images),
                class_adherence=float(np.mean(adherence)), class_samples=len(class_images),
                subject_leak=float(np.mean([draws_a_bar(image) for image in class_images])))


def table(results: list[dict]) -> str:
    lines = ["| prior | steps | lr | rank | LoRA targets | prior weight | trigger hit rate (samples) | class adherence "
             "| drift vs base | subject leak | train CPU min (wall) | class images CPU min |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        if result["prior"] == "base":
            lines.append(f"| base (no fine-tune) | | | | | | {result['trigger_hit_rate']:.3f} ({result['trigger_samples']}) "
                         f"| {result['class_adherence']:.3f} | | {result['subject_leak']:.3f} | | |")
            continue
        images = result.get("class_images_cpu_minutes")
        lines.append(
            f"| {result['prior']} | {result['steps']} | {result['learning_rate']:g} | {result['rank']} | "
            f"{result.get('lora_targets') or 'default'} | {result['prior_loss_weight']:g} | "
            f"{result['trigger_hit_rate']:.3f} ({result['trigger_samples']}) | "
            f"{result['class_adherence']:.3f} | {result['drift']:+.3f} | {result['subject_leak']:.3f} | "
            f"{result['train_cpu_minutes']:.1f} ({result['train_wall_minutes']:.1f}) | "
            f"{'' if images is None else f'{images:.1f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", action="append", choices=PRIORS, help="only this prior (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="a few steps and samples: checks the bench runs")
    parser.add_argument("--root", type=Path, help="working folder, which keeps the base (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("subject-bench.json"), help="results, written as they come")
    for key, value in FINETUNE.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value, help=f"default {value}")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="sdpipe-subject-bench-"))
    settings = {key: getattr(args, key) for key in FINETUNE} | (
        {key: SMOKE[key] for key in ("steps", "batch_size", "num_class_images")} if args.smoke else {})
    trigger_seeds = SMOKE["trigger_seeds"] if args.smoke else TRIGGER_SEEDS
    base = base_model(root, args.smoke)
    evaluated = finetune_params("none", settings, args.smoke)  # evaluate's settings, as every run samples them
    cached = base.parent / f"subject-bench-base{'-smoke' if args.smoke else ''}.json"
    if not cached.is_file():
        render_subject(root / "subject-images", evaluated.preprocess.resolution)
        cached.write_text(json.dumps(dict(prior="base", **measure(base, evaluated, trigger_seeds),
                                          vae_round_trip_hit_rate=vae_round_trip_hit_rate(base, root / "subject-images"))))
    results = [json.loads(cached.read_text()) | text_cosines(base)]
    print(json.dumps(results[0]), flush=True)
    for prior in args.prior or PRIORS:
        paths, timing = finetune(prior, settings, base, root, args.smoke)
        result = dict(prior=prior, **settings, **timing, **measure(paths.sd_model, evaluated, trigger_seeds))
        result["drift"] = result["class_adherence"] - results[0]["class_adherence"]
        result["target_met"] = result["trigger_hit_rate"] >= TARGET_HIT_RATE and abs(result["drift"]) <= TARGET_DRIFT
        print(json.dumps(result), flush=True)
        results.append(result)
        args.out.write_text(json.dumps(results, indent=2))
    print("\n" + table(results))


if __name__ == "__main__":
    main()
