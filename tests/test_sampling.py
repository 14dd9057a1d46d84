"""Schedule and step functions: the same numbers as diffusers' scheduler, and Flow-GRPO's SDE maths."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from uniref_core.sampling import euler_step, flow_schedule, noise_latents, sde_step, true_cfg
from uniref_core.tiny import SCHEDULER_CONFIG


@pytest.mark.parametrize("steps", [2, 4, 10, 50])
@pytest.mark.parametrize("tokens", [64, 256, 4096, 12000])
def test_schedule_is_bit_identical_to_diffusers_scheduler(steps, tokens):
    ref = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    ours = flow_schedule(steps, tokens, SCHEDULER_CONFIG)
    import numpy as np

    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=ours.mu)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas[-1] == 0 and abs(float(ours.sigmas[-2]) - 0.02) < 1e-6  # shift_terminal


def test_more_output_tokens_shift_the_schedule_towards_noise():
    small, large = flow_schedule(10, 256), flow_schedule(10, 8192)
    assert large.mu > small.mu
    assert (large.sigmas[1:-2] > small.sigmas[1:-2]).all()


def test_one_step_schedule_is_finite():
    s = flow_schedule(1, 4096)
    assert torch.isfinite(s.sigmas).all() and s.sigmas.tolist() == [1.0, 0.0]


def test_euler_step_matches_scheduler_step():
    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    ours = flow_schedule(5, 1024, SCHEDULER_CONFIG)
    import numpy as np

    sched.set_timesteps(sigmas=np.linspace(1.0, 0.2, 5), mu=ours.mu)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    for i, t in enumerate(sched.timesteps):
        want = sched.step(v, t, x, return_dict=False)[0]
        got = euler_step(x, v, ours.sigmas[i], ours.sigmas[i + 1])
        assert torch.equal(want, got)
        x = got


def test_sde_step_log_prob_is_the_gaussian_density_of_the_sample():
    g = torch.Generator().manual_seed(1)
    x, v, eps = (torch.randn(3, 10, 8, generator=g) for _ in range(3))
    sigma, sigma_next, eta = 0.7, 0.55, 0.8
    sample, log_prob, mean, std = sde_step(x, v, sigma, sigma_next, eta=eta, noise=eps)
    # std·sqrt(−dt) with std = η·sqrt(σ/(1−σ)).
    assert torch.allclose(std, torch.tensor(eta * math.sqrt(sigma / (1 - sigma)) * math.sqrt(sigma - sigma_next)))
    dt = sigma_next - sigma
    s2 = (eta**2) * sigma / (1 - sigma)
    want_mean = x + (v + s2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    assert torch.allclose(mean, want_mean, atol=1e-6)
    dist = torch.distributions.Normal(mean, std)
    assert torch.allclose(log_prob, dist.log_prob(sample).mean(dim=(1, 2)), atol=1e-5)
    # Scoring the same sample again (the RL ratio's denominator) gives the same log-prob.
    _, again, _, _ = sde_step(x, v, sigma, sigma_next, eta=eta, prev_sample=sample)
    assert torch.allclose(again, log_prob)
    # A sample far from the mean is less likely.
    _, far, _, _ = sde_step(x, v, sigma, sigma_next, eta=eta, prev_sample=sample + 3 * std)
    assert (far < log_prob).all()


def test_sde_step_at_pure_noise_is_finite_and_tends_to_euler_as_eta_vanishes():
    g = torch.Generator().manual_seed(2)
    x, v, eps = (torch.randn(1, 4, 4, generator=g) for _ in range(3))
    sample, log_prob, _, _ = sde_step(x, v, 1.0, 0.9, eta=0.7, noise=eps)
    assert torch.isfinite(sample).all() and torch.isfinite(log_prob).all()
    tiny, _, _, _ = sde_step(x, v, 0.6, 0.5, eta=1e-6, noise=eps)
    assert torch.allclose(tiny, euler_step(x, v, 0.6, 0.5), atol=1e-5)


def test_sde_step_needs_noise_or_sample():
    with pytest.raises(ValueError, match="noise"):
        sde_step(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.4)


def test_true_cfg_pushes_away_from_negative_and_keeps_cond_norm():
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    out = true_cfg(cond, uncond, 4.0)
    assert torch.allclose(out.norm(dim=-1), cond.norm(dim=-1), atol=1e-5)
    direction = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(torch.nn.functional.cosine_similarity(out, direction, dim=-1), torch.ones(1, 5), atol=1e-5)


def test_noise_latents_interpolates():
    x0, n = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    assert torch.allclose(noise_latents(x0, n, 0.25), torch.full((1, 3, 2), 0.75))
