"""Training resumes exactly after a SIGKILL, and a NaN loss stops it with the last good checkpoint kept."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file, save_file

from pipeline.contracts.paths import Paths
from pipeline.core.params_file import parse_params
from pipeline.diffusion.families import family_named
from pipeline.stages.train import TrainingDiverged, train
from pipeline.training.checkpoints import checkpoint_folders

from .conftest import merge, tiny_params_dict

RESUME_OVERRIDES = {"train": {"steps": 40, "checkpoint_every": 10, "log_every": 10, "validate_every": 40,
                              "sample_every": 0, "ema_decay": 0.99, "snr_gamma": 5.0, "noise_offset": 0.05}}
# A flow family (flux: packing, guidance embedding, resolution shift; EMA and caption dropout as for sd), shorter:
# killed after its first checkpoint at step 10, it still has most of its steps to go.
FLOW_RESUME_OVERRIDES = {"model": {"family": "flux", "max_sequence_length": 8},
                         "train": {"steps": 30, "checkpoint_every": 10, "log_every": 10, "validate_every": 30,
                                   "sample_every": 0, "ema_decay": 0.99, "noise_offset": 0.05,
                                   "flow": {"sampling": "mode", "weighting": "cosmap"}}}


def _project(trained_project, root: Path, overrides: dict) -> tuple:
    """A copy of the trained project's inputs to `train` (latents, VAE) with its own params.yaml."""
    _, trained = trained_project
    for folder in ("data/latents", "models/vae"):
        shutil.copytree(trained.root / folder, root / folder)
    raw = merge(tiny_params_dict(), overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_params(raw), Paths(root)


def _weights(paths: Paths, denoiser: str = "unet") -> dict:
    return load_file(paths.sd_model / denoiser / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("overrides", [RESUME_OVERRIDES, FLOW_RESUME_OVERRIDES], ids=["sd", "flux"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_result(trained_project, tmp_path, overrides):
    params, straight = _project(trained_project, tmp_path / "straight", overrides)
    expected = train(params, straight)

    _, killed = _project(trained_project, tmp_path / "killed", overrides)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen([str(Path(sys.executable).parent / "sdpipe"), "--params",
                                str(killed.root / "params.yaml"), "train"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint_folders(killed) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint_folders(killed), "the run ended before its first checkpoint"
    assert not killed.sd_model.exists(), "the run finished before it was killed"

    resumed = train(params, killed)
    assert 0 < resumed["resumed_from_step"] < params.train.steps
    assert resumed["steps"] == expected["steps"] == params.train.steps
    recorded = [json.loads((p.metrics / "train.json").read_text()) for p in (straight, killed)]
    assert recorded[0]["data_digest"] == recorded[1]["data_digest"], "the resumed run saw other data"
    assert (straight.metrics / "train_loss.csv").read_text() == (killed.metrics / "train_loss.csv").read_text()
    denoiser = family_named(params.model.family).denoiser
    first, second = _weights(straight, denoiser), _weights(killed, denoiser)
    assert all((first[name] - second[name]).abs().max() < 1e-5 for name in first)
    assert not checkpoint_folders(killed), "a finished run's checkpoints are never resumed, so not kept"
    assert (killed.sd_model / "README.md").read_text().startswith("---\nlibrary_name: diffusers")


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(trained_project, tmp_path):
    params, paths = _project(trained_project, tmp_path / "nan", {"train": {
        "steps": 30, "checkpoint_every": 1, "log_every": 1, "validate_every": 30, "sample_every": 0}})
    last = pd.read_parquet(paths.latents / "train.parquet").iloc[-1]
    cache = load_file(paths.latents / last["posterior"])
    cache[f"mean.{last['height']}x{last['width']}"][last["row"]] = float("nan")  # the first batch drawing it fails
    save_file(cache, paths.latents / last["posterior"])
    with pytest.raises(TrainingDiverged, match="last good checkpoint is .*step-") as failure:
        train(params, paths)
    last = checkpoint_folders(paths)[-1]
    assert str(last) in str(failure.value)
    assert not paths.sd_model.exists()


def test_a_finished_run_is_trained_afresh_when_the_stage_runs_again(trained_project, tmp_path):
    params, paths = _project(trained_project, tmp_path / "again", {"train": {
        "steps": 4, "checkpoint_every": 2, "log_every": 2, "validate_every": 4, "sample_every": 0}})
    first = train(params, paths)
    second = train(params, paths)  # e.g. `dvc repro -f`, or after a change to the training code
    assert second["resumed_from_step"] == 0 and second["images_per_second"] > 0
    assert second["final_loss"] == first["final_loss"]  # the same run again, not a no-op
