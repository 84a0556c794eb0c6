"""The diffusion math: targets, min-SNR weights and the sampling defaults that other files copy."""

import ast
from pathlib import Path

import pytest
import torch

from pipeline.core.config import EvaluateParams, TrainParams
from pipeline.diffusion.schedule import (
    SAMPLE_GUIDANCE,
    SAMPLE_STEPS,
    min_snr_weights,
    training_noise,
    training_scheduler,
    training_target,
)


def test_the_target_is_the_noise_or_the_velocity():
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([1, 500, 999])
    assert torch.equal(training_target(training_scheduler("epsilon"), latents, noise, timesteps), noise)
    scheduler = training_scheduler("v_prediction")
    alpha = scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(training_target(scheduler, latents, noise, timesteps), alpha * noise - sigma * latents,
                          atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_min_snr_gamma_over_the_targets_own_weight(prediction_type):
    scheduler = training_scheduler(prediction_type)
    timesteps = torch.tensor([1, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    weights = min_snr_weights(scheduler, timesteps, gamma=5.0)
    assert torch.allclose(weights, expected, rtol=1e-4)
    assert weights[0] < 1, "a nearly clean timestep (SNR far above gamma) is down-weighted"


def test_the_noise_offset_shifts_each_channel():
    plain = training_noise(torch.Size((2, 4, 8, 8)), torch.Generator().manual_seed(0))
    offset = training_noise(torch.Size((2, 4, 8, 8)), torch.Generator().manual_seed(0), noise_offset=0.5)
    shift = offset - plain
    assert shift.abs().sum() > 0
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift)), "one constant per sample and channel"


def test_copies_of_the_sampling_defaults_agree():
    assert (EvaluateParams().num_inference_steps, EvaluateParams().guidance_scale) == (SAMPLE_STEPS, SAMPLE_GUIDANCE)
    assert TrainParams().sample_steps == SAMPLE_STEPS
    # mlflow_model.py is stored with the model and runs without sdpipe, so it keeps its own copy
    source = Path(__file__).parents[1] / "pipeline" / "tracking" / "mlflow_model.py"
    defaults = next(node.value for node in ast.parse(source.read_text()).body
                    if isinstance(node, ast.Assign) and node.targets[0].id == "DEFAULTS")
    served = ast.literal_eval(defaults)
    assert (served["steps"], served["guidance"]) == (SAMPLE_STEPS, SAMPLE_GUIDANCE)
