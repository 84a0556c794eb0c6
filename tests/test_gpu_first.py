"""GPU-first, checked on the CPU: one device rule, frozen weights in the weight dtype, LoRA checkpoints that hold
only LoRA weights, honest throughput in train.json, the speed levers, and encode's split over processes."""

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

import pipeline.stages.train as train_module
from pipeline.cli import main as sdpipe
from pipeline.diffusion.families import load_pipeline
from pipeline.runtime.device import FORCE_CPU, compute_device
from pipeline.stages.train import train
from pipeline.training.checkpoints import LORA_CHECKPOINT, checkpoint_folders
from pipeline.training.throughput import Throughput, flops_of

from .test_finetune import base_model, finetune_params, project  # noqa: F401  (base_model is a fixture)


def test_every_network_runs_on_accelerates_device(trained_project, monkeypatch):
    from accelerate import PartialState

    assert compute_device() == PartialState().device
    pipeline = load_pipeline(trained_project[1].sd_model)
    assert {module.device for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder)} == {compute_device()}
    monkeypatch.setenv(FORCE_CPU, "false")  # restored after the test, whatever the command sets
    assert sdpipe(["--params", str(trained_project[1].root / "missing.yaml"), "--device", "cpu", "models"]) == 1
    assert os.environ[FORCE_CPU] == "true" and compute_device().type == "cpu"


def test_train_json_reports_steady_state_speed_and_flops(trained_project):
    params, paths = trained_project
    metrics = json.loads((paths.metrics / "train.json").read_text())
    steps = params.train.steps
    assert metrics["warmup_steps"] == min(10, steps // 5) and metrics["steady_steps"] == steps - metrics["warmup_steps"]
    for name in ("images_per_second", "steady_seconds", "warmup_seconds", "validation_seconds", "sampling_seconds",
                 "checkpoint_seconds", "flops_per_image"):
        assert metrics[name] > 0, name
    spent = sum(metrics[f"{what}_seconds"] for what in ("steady", "warmup", "validation", "sampling", "checkpoint"))
    assert spent <= metrics["seconds"] * 1.01
    assert "mfu" not in metrics  # no measured peak on a CPU
    # the stage's count covers the UNet's forward and backward passes and the text encoder's (scratch mode)
    pipeline = load_pipeline(paths.sd_model)
    latents = torch.zeros(1, 4, 8, 8)
    states = torch.zeros(1, pipeline.tokenizer.model_max_length, pipeline.unet.config.cross_attention_dim)
    with torch.no_grad():
        unet_forward = flops_of(lambda: pipeline.unet(latents, torch.tensor([1]), states))
    assert 2 * unet_forward < metrics["flops_per_image"] < 5 * unet_forward
    assert not checkpoint_folders(paths), "a finished run's checkpoints are never resumed, so not kept"


def test_throughput_leaves_out_warmup_and_excluded_work():
    speed = Throughput(torch.device("cpu"), steps_to_run=50)
    assert speed.warmup == 10
    for step in range(50):
        speed.step_done(images=4)
        if step == 30:
            with speed.excluded("validation"):
                time.sleep(0.05)
    summary = speed.summary()
    assert summary["steady_steps"] == 40 and speed.steady_images == 160
    assert summary["validation_seconds"] >= 0.05 and summary["steady_seconds"] < 0.05


@pytest.fixture
def captured_dtypes(monkeypatch):
    """The dtypes of the modules each train() call trains, seen as its loop starts."""
    seen, fit = [], train_module.fit

    def watching_fit(run, *args):
        model = run.model
        dtypes = {"vae": {p.dtype for p in model.vae.parameters()}, "text_encoder": model.text["text_encoder"]}
        dtypes["unet_trained"] = {p.dtype for p in model.denoiser.parameters() if p.requires_grad}
        dtypes["unet_frozen"] = {p.dtype for p in model.denoiser.parameters() if not p.requires_grad}
        dtypes["trained_names"] = {name for name, p in model.denoiser.named_parameters() if p.requires_grad}
        seen.append(dtypes)
        return fit(run, *args)

    monkeypatch.setattr(train_module, "fit", watching_fit)
    return seen


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; this test needs its own (bf16)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_frozen_weights_are_in_the_weight_dtype_and_trained_ones_in_fp32(trained_project, base_model, tmp_path,
                                                                         captured_dtypes, fresh_accelerator_state):
    params = finetune_params(base_model, finetune="lora")
    # with the cheap levers on (tf32 is a no-op off CUDA); train.compile has no CPU test: inductor compiling
    # the UNet's forward and backward takes minutes on the project's 2 shared cores
    levers = {"mixed_precision": "bf16", "steps": 4, "channels_last": True, "tf32": True}
    params = params.model_copy(update={"train": params.train.model_copy(update=levers)})
    paths, _ = project(trained_project, tmp_path, params)
    train(params, paths)
    [dtypes] = captured_dtypes
    assert dtypes["trained_names"] and all("lora" in name for name in dtypes["trained_names"])
    assert dtypes["unet_trained"] == {torch.float32}
    assert dtypes["unet_frozen"] == dtypes["vae"] == {torch.bfloat16}
    assert dtypes["text_encoder"] is None, "train loaded the frozen text encoder: encode cached its states"
    for module in ("vae/diffusion_pytorch_model", "text_encoder/model"):  # saved as stored, not as trained
        assert {t.dtype for t in load_file(paths.sd_model / f"{module}.safetensors").values()} == {torch.float32}


@pytest.mark.parametrize("optimizer", [{"optimizer": "adamw"}, {"optimizer": "prodigy", "learning_rate": 1.0}],
                         ids=["adamw", "prodigy"])
def test_lora_checkpoints_hold_only_lora_weights_and_resume_exactly(trained_project, base_model, tmp_path,
                                                                    monkeypatch, optimizer):
    params = finetune_params(base_model, finetune="lora")
    params = params.model_copy(update={"train": params.train.model_copy(update={
        "steps": 8, "checkpoint_every": 4, "validate_every": 5, "log_every": 1, **optimizer})})
    straight, _ = project(trained_project, tmp_path / "straight", params)
    expected = train(params, straight)

    paths, _ = project(trained_project, tmp_path / "killed", params)
    validation_loss = train_module.Run.validation_loss

    def dies_at_step_5(run):
        raise Killed

    monkeypatch.setattr(train_module.Run, "validation_loss", dies_at_step_5)
    with pytest.raises(Killed):
        train(params, paths)
    [checkpoint] = checkpoint_folders(paths)
    files = {path.name for path in checkpoint.iterdir()}
    assert LORA_CHECKPOINT in files and not any(name.startswith(("model", "pytorch_model")) for name in files)
    lora = load_file(checkpoint / LORA_CHECKPOINT)
    assert lora and all("lora" in key for key in lora)
    [group] = torch.load(checkpoint / "optimizer.bin", weights_only=False)["param_groups"]
    if optimizer["optimizer"] == "prodigy":  # the sums behind its step-size estimate, which resuming must restore
        assert group["k"] == 4 and group["d_numerator"] > 0 and group["d"] >= group["d0"]
    monkeypatch.setattr(train_module.Run, "validation_loss", validation_loss)
    resumed = train(params, paths)
    assert resumed["resumed_from_step"] == 4 and resumed["final_loss"] == expected["final_loss"]
    assert (straight.metrics / "train_loss.csv").read_text() == (paths.metrics / "train_loss.csv").read_text()
    first, second = (load_file(p.sd_model / "pytorch_lora_weights.safetensors") for p in (straight, paths))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=1e-6)


class Killed(Exception):
    """Stands in for a SIGKILL in the middle of a run (tests/test_resume.py sends the real one)."""
