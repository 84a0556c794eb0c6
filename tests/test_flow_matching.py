"""Flow matching draws σ, noises and weights exactly as diffusers' SD3/Flux training scripts do."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from pipeline.diffusion.flow_matching import RESOLUTION_SHIFT, FlowMatching
from pipeline.diffusion.schedule import weighted_mse

LATENTS = torch.Size((6, 4, 8, 8))


def script_sigmas(scheme: str, shift: float, seed: int, count: int, **density) -> torch.Tensor:
    """σ as train_dreambooth_lora_sd3.py gets them: u, indices into the scheduler copy's timesteps, and
    `get_sigmas`, which looks each timestep up in the schedule."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    u = compute_density_for_timestep_sampling(scheme, count, generator=torch.Generator().manual_seed(seed), **density)
    timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    return scheduler.sigmas[[(scheduler.timesteps == t).nonzero().item() for t in timesteps]]


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigma_draws_equal_the_diffusers_scripts(scheme, shift):
    density = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    flow = FlowMatching(sampling=scheme, shift=shift, **density)
    drawn = flow.draw_sigmas(64, LATENTS, torch.Generator().manual_seed(7))
    torch.testing.assert_close(drawn, script_sigmas(scheme, shift, 7, 64, **density), rtol=0, atol=0)
    assert drawn.min() > 0 and drawn.max() <= 1
    if scheme == "logit_normal" and shift == 1.0:  # the density itself: σ ≈ 1 - sigmoid(N(m, s)), on the table
        u = torch.sigmoid(torch.normal(0.3, 1.2, (64,), generator=torch.Generator().manual_seed(7)))
        torch.testing.assert_close(drawn, 1 - torch.floor(u * 1000) / 1000, atol=1e-6, rtol=0)


def test_a_training_batch_is_the_scripts_noisy_input_target_and_weight():
    latents = torch.randn(LATENTS, generator=torch.Generator().manual_seed(1))
    for weighting in ("none", "sigma_sqrt", "cosmap"):
        flow = FlowMatching(sampling="logit_normal", weighting=weighting, shift=3.0)
        batch = flow.training_batch(latents, torch.Generator().manual_seed(5))
        generator = torch.Generator().manual_seed(5)
        noise = torch.randn(LATENTS, generator=generator)  # the noise first, then u, from one generator
        u = compute_density_for_timestep_sampling("logit_normal", len(latents), logit_mean=0.0, logit_std=1.0,
                                                  generator=generator)
        sigmas = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas[(u * 1000).long()]
        expanded = sigmas.view(-1, 1, 1, 1)
        torch.testing.assert_close(batch.noisy, (1.0 - expanded) * latents + expanded * noise, rtol=0, atol=0)
        torch.testing.assert_close(batch.target, noise - latents, rtol=0, atol=0)
        torch.testing.assert_close(batch.timesteps, sigmas * 1000, rtol=0, atol=0)
        if weighting == "none":
            assert batch.weights is None
        else:
            torch.testing.assert_close(batch.weights, compute_loss_weighting_for_sd3(weighting, sigmas))


def test_the_weighted_loss_is_the_scripts_loss():
    generator = torch.Generator().manual_seed(2)
    prediction, target = torch.randn(LATENTS, generator=generator), torch.randn(LATENTS, generator=generator)
    weights = torch.rand(len(prediction), generator=generator)
    script = torch.mean((weights.view(-1, 1, 1, 1) * (prediction - target) ** 2).reshape(len(target), -1), 1).mean()
    torch.testing.assert_close(weighted_mse(prediction, target, weights), script)
    torch.testing.assert_close(weighted_mse(prediction, target, None), torch.mean((prediction - target) ** 2))


def test_resolution_dependent_shift_follows_the_token_count_as_flux_sampling_does():
    flow = FlowMatching(shift=RESOLUTION_SHIFT)
    # diffusers' defaults: μ = 0.5 at 256 tokens (a 32x32 latent in 2x2 patches), 1.15 at 4096 (128x128)
    assert flow.shift_for(torch.Size((1, 16, 32, 32))) == pytest.approx(math.exp(0.5))
    assert flow.shift_for(torch.Size((1, 16, 128, 128))) == pytest.approx(math.exp(1.15))
    custom = FlowMatching(shift=RESOLUTION_SHIFT, scheduler_config={"base_shift": 0.2, "max_shift": 0.2})
    assert custom.shift_for(torch.Size((1, 16, 64, 64))) == pytest.approx(math.exp(0.2))
    # the sampler Flux's pipeline builds with μ of that size uses the same noise levels
    latent = torch.Size((1, 16, 64, 64))
    sampler = flow.sampling_scheduler()
    assert sampler.config.use_dynamic_shifting
    mu = math.log(flow.shift_for(latent))
    sampler.set_timesteps(sigmas=[0.8, 0.5, 0.2], mu=mu)
    expected = torch.cat([flow.sigmas_at(timestep, 1, latent) for timestep in (800, 500, 200)])
    torch.testing.assert_close(sampler.sigmas[:3], expected, atol=1e-6, rtol=0)


def test_fixed_timesteps_are_shifted_noise_levels():
    flow = FlowMatching(shift=3.0)
    latents, noise = torch.ones(LATENTS), torch.zeros(LATENTS)
    half = flow.batch_at(latents, noise, 500)
    torch.testing.assert_close(half.timesteps, torch.full((6,), 750.0))  # 3·0.5 / (1 + 2·0.5) = 0.75
    torch.testing.assert_close(half.noisy, torch.full(LATENTS, 0.25))
    assert torch.equal(flow.batch_at(latents, noise, 0).noisy, latents)


def test_unknown_schemes_are_named():
    with pytest.raises(ValueError, match="sigma sampling 'cosine'"):
        FlowMatching(sampling="cosine")
    with pytest.raises(ValueError, match="loss weighting 'snr'"):
        FlowMatching(weighting="snr")
