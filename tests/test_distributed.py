"""DDP on the CPU: two accelerate processes (gloo) train the stage correctly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler

from pipeline.training.checkpoints import checkpoint_folders

from .conftest import free_port
from .test_resume import _project


def launch_two_processes(paths, command: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    # `--cpu` alone starts a single process unless an MPI launcher is set up; `--multi_gpu` with
    # ACCELERATE_USE_CPU=1 starts real DDP processes (torch.distributed.run, gloo) on the CPU.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "pipeline.cli", "--params", str(paths.root / "params.yaml"), command],
        cwd=paths.root, env=env, capture_output=True, text=True, timeout=600,
    )


def one_process_learning_rates(settings) -> list[float]:
    """The LR after each optimizer step of one process: the schedule train.* describes, stepped once a step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.learning_rate)
    schedule = get_scheduler(settings.lr_schedule, optimizer, num_warmup_steps=settings.warmup_steps,
                             num_training_steps=settings.steps)
    rates = []
    for _ in range(settings.steps):
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    return rates


def logged_learning_rates(paths) -> list[float]:
    run_id = json.loads(paths.run_record.read_text())["run_id"]
    history = mlflow.MlflowClient(f"sqlite:///{paths.root / 'mlflow.db'}").get_metric_history(run_id, "lr")
    return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]


@pytest.mark.e2e
def test_two_processes_train_one_model(trained_project, tmp_path):
    params, paths = _project(trained_project, tmp_path / "ddp", {"train": {
        "steps": 20, "batch_size": 16, "checkpoint_every": 10, "log_every": 1, "validate_every": 20,
        "sample_every": 0, "warmup_steps": 5, "lr_schedule": "cosine"}})
    result = launch_two_processes(paths, "train")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # accelerate steps a prepared schedule once per process: the LR must still follow one process's schedule
    rates = logged_learning_rates(paths)
    assert rates == pytest.approx(one_process_learning_rates(params.train), rel=1e-6)
    warmup = params.train.warmup_steps
    assert rates[warmup - 1] == pytest.approx(params.train.learning_rate)  # logged after step `warmup`
    assert rates[warmup - 2] < params.train.learning_rate
    metrics = json.loads((paths.metrics / "train.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 20
    curve = [float(line.split(",")[1]) for line in (paths.metrics / "train_loss.csv").read_text().splitlines()[1:]]
    assert curve[-1] < curve[0], f"the loss did not fall: {curve}"
    assert not checkpoint_folders(paths)  # the one at step 10 went when the run finished
    pipeline = StableDiffusionPipeline.from_pretrained(paths.sd_model)
    assert pipeline("a red circle", num_inference_steps=2).images[0].size == (32, 32)
