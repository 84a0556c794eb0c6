"""GPU benchmark: the encode stage, the train stage (full UNet and LoRA) and a train_text_to_image.py loop, side
by side on one random SD 1.5-sized pipeline and the same 512 px images.

    python bench/gpu.py                       # one GPU: about 6 minutes on an H100 (each measurement has a limit)
    python bench/gpu.py --tiny                # any CPU: the tiny preset at 64 px (tests/test_bench_gpu.py runs it)
    python bench/gpu.py --only "train full"   # one measurement again (results accumulate in --out)
    python bench/gpu.py --family flux         # another family's real-size architecture (docs/guides/model-families.md)

`--family` (sd, sdxl, sd3, flux, chroma, zimage) measures that family's real-size preset instead (sdxl;
sd35_medium; flux_dev; chroma1; z_image_6b), randomly initialised the same way, with encode, train full and
train LoRA (the diffusers loop is SD 1.x's script, so it runs for sd only). Not yet measured on a GPU: no machine
was lent when it was added.

The pipeline is the repo's `sd15` UNet and text encoder with Stable Diffusion's VAE configuration, randomly
initialised and saved as a diffusers folder (the stand-in for real SD 1.5 weights: the same shapes, files and
code path). The images are the embedded synthetic shapes rendered by `ingest` at 512 px and preprocessed; the
Great Expectations validation is skipped (every render is valid, and the GPU machine lacks the library).

Each measurement runs in its own process under its own time limit, so one that runs out of memory or time costs
only itself, and is written to --out (JSON) as soon as it ends. Nothing needs MLflow, DVC or Prefect: the train
stage runs with `tracked=False`. The table gives images/s (the stage's steady state: warm-up steps, validation
and saving left out), peak GPU memory, MFU against the bf16 matmul rate measured on the same GPU, and ratios.
"""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "DO_NOT_TRACK", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # runs from a plain copy of the repo, nothing installed

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.contracts.data import MANIFEST  # noqa: E402
from pipeline.contracts.paths import Paths  # noqa: E402
from pipeline.core.config import Params, VaeParams  # noqa: E402
from pipeline.core.params_file import parse_params  # noqa: E402


@dataclass(frozen=True)
class Setup:
    preset: str
    resolution: int
    images: int  # rendered; about 90 % train
    batch_size: int
    steps: int
    mixed_precision: str
    encode_dtype: str
    vae_channels: tuple[int, ...]
    loader_workers: int
    levers: bool  # also measure the speed levers
    family: str = "sd"


GPU = Setup("sd15", 512, 550, 16, 60, "bf16", "bfloat16", (128, 256, 512, 512), 8, levers=True)
TINY = Setup("tiny", 64, 48, 8, 10, "no", "float32", (16, 32, 32, 32), 0, levers=False)
# seconds each measurement may take on an H100 (compiling the SD 1.5 UNet alone took about 150 s)
LIMITS = {"encode": 120, "train full": 150, "train LoRA": 150, "diffusers loop": 150,
          "train full, compile": 330, "train full, batch 32": 150}
TINY_LIMIT = 300  # a loaded 2-core CI machine
# --family's real sizes
GPU_PRESETS = {"sd": "sd15", "sdxl": "sdxl", "sd3": "sd35_medium", "flux": "flux_dev", "chroma": "chroma1",
               "zimage": "z_image_6b"}


def setup_for(tiny: bool, family: str) -> Setup:
    """The tiny CPU setup or the GPU one, for a family: its tiny preset, or its real-size one without the levers."""
    if family == "sd":
        return TINY if tiny else GPU
    return replace(TINY if tiny else GPU, family=family, preset="tiny" if tiny else GPU_PRESETS[family], levers=False)


# ---------------------------------------------------------------- the project the measurements share


def bench_params(setup: Setup, root: Path, **train) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["ingest"]["synthetic"].update(count=setup.images, resolution=setup.resolution)
    raw["preprocess"].update(resolution=setup.resolution)
    raw["model"].update(family=setup.family, mode="finetune", pretrained=str(root / "pretrained"), finetune="full")
    raw["encode"].update(batch_size=32, dtype=setup.encode_dtype)
    raw["train"].update(steps=setup.steps, batch_size=setup.batch_size, mixed_precision=setup.mixed_precision,
                        log_every=10, validate_every=setup.steps, checkpoint_every=setup.steps, sample_every=0,
                        warmup_steps=0, caption_dropout=0.0, ema_decay=None)
    raw["train"].update(train)
    return parse_params(raw)


def prepare(setup: Setup, root: Path) -> None:
    """Rendered, preprocessed images in root/project and the random pretrained model in root/pretrained."""
    from pipeline.stages.ingest import ingest
    from pipeline.stages.preprocess import preprocess

    params, paths = bench_params(setup, root), Paths(root / "project")
    ingest(params.ingest, paths)
    paths.validated.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths.raw / MANIFEST, paths.validated / MANIFEST)
    preprocess(params.preprocess, paths)
    captions = pd.read_parquet(paths.processed / "train" / MANIFEST)["caption"].tolist()
    random_model(setup, captions).save_pretrained(root / "pretrained", safe_serialization=True)


def random_model(setup: Setup, captions: list[str]):
    """The family's preset (denoiser, text encoders) and, at SD's sizes, SD 1.5's VAE configuration."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from pipeline.diffusion.families import family_named, random_pipeline

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1 B parameters: GPU speed
        pipeline = random_pipeline(family_named(setup.family), captions, preset=setup.preset,
                                   resolution=setup.resolution, vae=VaeParams(block_out_channels=setup.vae_channels))
        if setup.preset == "sd15":
            vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                block_out_channels=setup.vae_channels, layers_per_block=2, sample_size=512)
            pipeline = StableDiffusionPipeline(**{**pipeline.components, "vae": vae}, requires_safety_checker=False)
    return pipeline


def run_folder(root: Path, name: str) -> Paths:
    """A project of its own for one training run, sharing the encoded data and the VAE."""
    folder = root / "runs" / name.replace(" ", "-").replace(",", "")
    (folder / "models").mkdir(parents=True, exist_ok=True)
    for shared in ("data", "models/vae"):
        if not (folder / shared).exists():
            (folder / shared).symlink_to(root / "project" / shared)
    return Paths(folder)


# ---------------------------------------------------------------- measurements (each in its own process)


def measure_encode(setup: Setup, root: Path) -> dict:
    from pipeline.stages.encode import encode
    from pipeline.stages.vae import vae_stage

    params, paths = bench_params(setup, root), Paths(root / "project")
    vae_stage(paths, vae=params.vae, model=params.model, preprocess=params.preprocess)
    started = time.perf_counter()
    counts = encode(paths, encode=params.encode, model=params.model)
    seconds = time.perf_counter() - started
    images = counts["train"] + counts["val"]
    return dict(images=images, seconds=seconds, images_per_second=images / seconds,
                peak_memory_mb=peak_mb())


def measure_train(setup: Setup, root: Path, name: str, **train) -> dict:
    from pipeline.stages.train import train as train_stage

    finetune = "lora" if "LoRA" in name else "full"
    params = bench_params(setup, root, **train)
    params = params.model_copy(update={"model": params.model.model_copy(update={"finetune": finetune})})
    metrics = train_stage(params, run_folder(root, name), tracked=False)
    keep = ("images_per_second", "peak_memory_mb", "flops_per_image", "mfu", "matmul_flops_per_second",
            "steady_steps", "warmup_seconds", "trainable_parameters")
    return {key: metrics[key] for key in keep if key in metrics} | dict(batch_size=params.train.batch_size)


def measure_reference(setup: Setup, root: Path) -> dict:
    from train_reference import reference_loop, training_sources

    from pipeline.training.throughput import warmup_steps

    params = bench_params(setup, root)
    files, captions = training_sources(Paths(root / "project"))
    return reference_loop(params.train, params.model.pretrained, files, captions, warmup_steps(params.train.steps),
                          resolution=setup.resolution, workers=setup.loader_workers) | dict(batch_size=setup.batch_size)


def peak_mb() -> float:
    from pipeline.training.throughput import peak_memory_mb

    return peak_memory_mb(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def measurements(setup: Setup) -> dict:
    """name -> function(setup, root), in the order they run: the essentials first, then the levers."""
    plan = {"encode": measure_encode, "train full": partial(measure_train, name="train full"),
            "train LoRA": partial(measure_train, name="train LoRA")}
    if setup.family == "sd":
        plan["diffusers loop"] = measure_reference
    if setup.levers:
        plan["train full, compile"] = partial(measure_train, name="train full, compile", compile=True)
        plan["train full, batch 32"] = partial(measure_train, name="train full, batch 32", batch_size=32)
    return plan


def child(name: str, setup: Setup, root: Path, result_file: Path) -> None:
    result_file.write_text(json.dumps(measurements(setup)[name](setup, root)))


def measure_in_own_process(name: str, setup: Setup, root: Path, limit: float) -> dict:
    result_file = root / "results" / f"{name}.json"
    result_file.parent.mkdir(exist_ok=True)
    command = [sys.executable, __file__, "--child", name, "--root", str(root), "--family", setup.family,
               *(["--tiny"] if setup.preset == "tiny" else [])]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return dict(error=f"over its limit of {limit:.0f} s")
    if done.returncode or not result_file.is_file():
        return dict(error=(done.stderr or done.stdout)[-1500:])
    return json.loads(result_file.read_text()) | dict(wall_seconds=time.perf_counter() - started)


# ---------------------------------------------------------------- the table


def table(results: dict) -> str:
    full, reference = results.get("train full", {}), results.get("diffusers loop", {})
    peak = full.get("matmul_flops_per_second")
    lines = [f"{'measurement':<24} {'batch':>5} {'images/s':>9} {'peak GB':>8} {'MFU':>6} "
             f"{'vs diffusers':>12} {'vs full':>8}"]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"{name:<24} not measured: {result['error'].splitlines()[-1] if result['error'] else '?'}")
            continue
        rate = result["images_per_second"]
        # the reference does the same UNet training work per image as the full train stage
        flops = result.get("flops_per_image", full.get("flops_per_image") if name == "diffusers loop" else None)
        mfu = f"{rate * flops / peak:6.1%}" if peak and flops and name != "encode" else f"{'-':>6}"

        def ratio(other: dict) -> str:
            usable = name not in ("encode", "diffusers loop") and other.get("images_per_second")
            return f"{rate / other['images_per_second']:.2f}x" if usable else "-"

        lines.append(f"{name:<24} {result.get('batch_size', '-'):>5} {rate:9.1f} "
                     f"{result.get('peak_memory_mb', 0) / 1024:8.1f} {mfu} {ratio(reference):>12} "
                     f"{ratio(full) if name != 'train full' else '-':>8}")
    if peak:
        lines.append(f"MFU: images/s x training FLOPs per image (FlopCounterMode) / the measured bf16 matmul rate "
                     f"{peak / 1e12:.0f} TFLOP/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset at 64 px: a CPU smoke run")
    parser.add_argument("--out", type=Path, default=Path("gpu-bench.json"), help="results, written as they come")
    parser.add_argument("--root", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--only", action="append", help="run only this measurement (repeatable)")
    parser.add_argument("--family", default="sd", choices=tuple(GPU_PRESETS), help="the model family to measure")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup = setup_for(args.tiny, args.family)
    if args.child:
        return child(args.child, setup, args.root, args.root / "results" / f"{args.child}.json")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --tiny on a CPU")
    root = args.root or Path(tempfile.mkdtemp(prefix="sdpipe-gpu-bench-"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    results = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    print(f"{device}, torch {torch.__version__}; {asdict(setup)}; working folder {root}", flush=True)
    if not (root / "pretrained").is_dir():
        started = time.perf_counter()
        prepare(setup, root)
        print(f"data and random model ready in {time.perf_counter() - started:.0f} s", flush=True)
    for name in measurements(setup):
        if args.only and name not in args.only:
            continue
        results[name] = measure_in_own_process(name, setup, root, TINY_LIMIT if args.tiny else LIMITS[name])
        args.out.write_text(json.dumps(results, indent=2))
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print("\n" + table(results))
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
