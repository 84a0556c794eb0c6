"""The train stage against its own ceiling: a bare loop of the same model at the same batch and precision,
on any commit.

    .venv/bin/python bench/train_loop.py [--steps 200] [--repeats 3] [--at COMMIT ...] [--profile]
                                         [--mixed-precision no|bf16]

For the working tree and each --at commit (its own code, run by this venv's packages), in a temporary copy:
params.yaml's defaults with a VAE of a few steps (its quality does not change a step's cost) and --steps
training steps with no sample grids and the validation and checkpoint after the last timed step; the stages
before train run once, then, --repeats times, alternating, each in a fresh process:

- stage: `sdpipe train` as dvc runs it; images/s is its own steady-state figure (metrics/train.json: warm-up
  steps, validation and saving left out);
- bare: the UNet and text encoder of the config that run saved (models/sd), randomly initialised, trained on
  random latents and token ids of the same shapes: per step noise and timesteps drawn, the DDPM forward
  process, text encoder and UNet forward (under CPU autocast at the stage's train.mixed_precision), MSE,
  backward, gradient clipping, fused AdamW; one host sync per 50 steps, as the stage's logging has. Timed
  after the same warm-up steps. No data order, batch assembly, caption dropout, LR schedule, accelerate
  wrappers or logging: the ceiling for this model on this machine.

Prints each version's medians and stage / bare. The bare loop at two commits runs the same code on each
one's saved model config, so a change of its figure between commits is the machine's, not the code's.
--profile runs the working tree's stage once more under cProfile and prints where its time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 10  # pipeline.training.throughput.WARMUP_STEPS: the same steps left out of both figures
SYNC_EVERY = 50  # train.log_every's default: the stage's one host sync per logging window
PREP_VAE_STEPS = 20
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # train.mixed_precision: torch's dtype names
RUN_STAGE = "import sys; from pipeline.cli import main; sys.argv = ['sdpipe', *sys.argv[1:]]; sys.exit(main())"


def checkout(version: str, folder: Path) -> Path:
    """The working tree's tracked files (uncommitted edits included), or a commit's tree."""
    folder.mkdir(parents=True)
    if version == "worktree":
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
        for name in filter(None, files.decode().split("\0")):
            if (REPO / name).is_file():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, folder / name)
    else:
        archive = subprocess.run(["git", "archive", version], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def set_bench_params(project: Path, steps: int, mixed_precision: str | None) -> None:
    """Only keys the version's schema has: older commits lack some."""
    file = project / "params.yaml"
    params = yaml.safe_load(file.read_text())
    params["vae"]["steps"] = PREP_VAE_STEPS
    train = params["train"]
    train.update(steps=steps, validate_every=steps, checkpoint_every=steps)
    if mixed_precision:
        train["mixed_precision"] = mixed_precision
    if "sample_every" in train:
        train["sample_every"] = 0
    file.write_text(yaml.safe_dump(params, sort_keys=False))


def environment(project: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(project), "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_TELEMETRY": "false", "GX_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def stages_before_train(project: Path) -> list[str]:
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    return stages[: stages.index("train")]


def run_stage(project: Path, stage: str) -> None:
    run_in(project, [sys.executable, "-c", RUN_STAGE, stage])


def run_in(project: Path, command: list[str]) -> None:
    subprocess.run(command, cwd=project, env=environment(project), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def stage_images_per_second(project: Path) -> float:
    shutil.rmtree(project / "models" / "checkpoints", ignore_errors=True)
    run_stage(project, "train")
    return json.loads((project / "metrics" / "train.json").read_text())["images_per_second"]


def bare_images_per_second(project: Path, steps: int) -> float:
    result = subprocess.run([sys.executable, __file__, "--bare", str(project), "--steps", str(steps)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, capture_output=True,
                            text=True)
    return float(result.stdout.strip().splitlines()[-1])


def bare_loop(project: Path, steps: int, batch_size: int, mixed_precision: str) -> float:
    """The ceiling (module docstring). Runs in its own process."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = project / "models" / "sd"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model / "unet")).train()
    text_config = CLIPTextConfig.from_pretrained(model / "text_encoder")
    text_encoder = CLIPTextModel(text_config).train()
    schedule = DDPMScheduler.from_config(DDPMScheduler.load_config(model / "scheduler"))
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=1e-2, fused=True)
    shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = [torch.randn(shape) for _ in range(8)]
    ids = [torch.randint(0, text_config.vocab_size, (batch_size, text_config.max_position_embeddings))
           for _ in range(8)]
    window = []
    for step in range(steps):
        if step == WARMUP_STEPS:
            started = time.perf_counter()
        x0, tokens = latents[step % 8], ids[step % 8]
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (batch_size,))
        noisy = schedule.add_noise(x0, noise, timesteps)
        with torch.autocast("cpu", dtype=getattr(torch, AUTOCAST_DTYPES.get(mixed_precision, "bfloat16")),
                            enabled=mixed_precision in AUTOCAST_DTYPES):
            prediction = unet(noisy, timesteps, text_encoder(tokens)[0]).sample
            loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if (step + 1) % SYNC_EVERY == 0:
            float(torch.stack(window).mean())
            window.clear()
    return (steps - WARMUP_STEPS) * batch_size / (time.perf_counter() - started)


def profile_stage(project: Path) -> None:
    out = project / "train.prof"
    shutil.rmtree(project / "models" / "checkpoints", ignore_errors=True)
    run_in(project, [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "pipeline.cli", "train"])
    import pstats

    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def measure(version: str, workspace: Path, steps: int, repeats: int, mixed_precision: str | None) -> dict:
    project = checkout(version, workspace / version)
    set_bench_params(project, steps, mixed_precision)
    started = time.perf_counter()
    for stage in stages_before_train(project):
        run_stage(project, stage)
    print(f"{version}: data prepared in {time.perf_counter() - started:.0f} s", flush=True)
    batch_size = yaml.safe_load((project / "params.yaml").read_text())["train"]["batch_size"]
    figures = {"stage": [], "bare": []}
    for _ in range(repeats):
        figures["stage"].append(stage_images_per_second(project))
        figures["bare"].append(bare_images_per_second(project, steps))
        print(f"{version}: stage {figures['stage'][-1]:.1f}, bare {figures['bare'][-1]:.1f} images/s", flush=True)
    stage, bare = statistics.median(figures["stage"]), statistics.median(figures["bare"])
    return {"version": version, "batch_size": batch_size, "stage": stage, "bare": bare, "ratio": stage / bare,
            "runs": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--at", nargs="*", default=[], metavar="COMMIT", help="also bench these commits' code")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], help="train.mixed_precision of both loops "
                        "(default: params.yaml's)")
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)  # the bare loop's own process
    args = parser.parse_args()
    if args.bare:
        train = yaml.safe_load((args.bare / "params.yaml").read_text())["train"]
        print(bare_loop(args.bare, args.steps, train["batch_size"], train["mixed_precision"]))
        return
    with tempfile.TemporaryDirectory(prefix="train-loop-") as workspace:
        results = [measure(version, Path(workspace), args.steps, args.repeats, args.mixed_precision)
                   for version in ["worktree", *args.at]]
        print(f"\n{'version':<12} {'batch':>5} {'stage img/s':>12} {'bare img/s':>11} {'stage/bare':>10}")
        for r in results:
            print(f"{r['version']:<12} {r['batch_size']:>5} {r['stage']:>12.1f} {r['bare']:>11.1f} {r['ratio']:>10.2f}")
        print(json.dumps(results))
        if args.profile:
            profile_stage(Path(workspace) / "worktree")


if __name__ == "__main__":
    main()
