"""Flow-matching schedule and the step functions shared by inference and RL training.

σ = 1 is pure noise, σ = 0 the clean image; the model predicts the velocity v = noise − x0.
Every function here is pure (tensors in, tensors out) and computes in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Qwen-Image's scheduler config (scheduler/scheduler_config.json of the published repos).
DEFAULT_SCHEDULE = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
    "shift": 1.0,
    "num_train_timesteps": 1000,
}


def calculate_shift(seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """μ of the dynamic time shift, linear in the number of OUTPUT tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


@dataclass(frozen=True)
class Schedule:
    """σ for each step plus a final 0; ``timesteps`` are σ·1000 as the scheduler hands them out."""

    sigmas: torch.Tensor  # [N + 1] fp32, ends with 0
    mu: float

    @property
    def timesteps(self) -> torch.Tensor:
        return self.sigmas[:-1] * 1000.0

    def __len__(self) -> int:
        return len(self.sigmas) - 1


def flow_schedule(steps: int, output_tokens: int, config: dict | None = None) -> Schedule:
    """σ = linspace(1, 1/N, N), time-shifted by μ(output tokens), stretched to ``shift_terminal``.

    The arithmetic (numpy fp32) is the one of diffusers' FlowMatchEulerDiscreteScheduler, so the
    σ values are bit-identical to it.
    """
    cfg = {**DEFAULT_SCHEDULE, **(config or {})}
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    mu = calculate_shift(
        output_tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
    )
    if cfg["use_dynamic_shifting"]:
        if cfg["time_shift_type"] == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        shift = cfg["shift"]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    # With one step σ = [1] and the terminal stretch would be 0/0 (diffusers returns NaN there).
    if cfg.get("shift_terminal") and steps > 1:
        one_minus = 1 - sigmas
        scale = one_minus[-1] / (1 - cfg["shift_terminal"])
        sigmas = 1 - (one_minus / scale)
    sig = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return Schedule(sigmas=torch.cat([sig, torch.zeros(1)]), mu=mu)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic (ODE) step from σ to σ_next; fp32 inside, the model output's dtype out."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return (x.to(torch.float32) + dt * v).to(v.dtype)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    eta: float = 0.7,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
):
    """Flow-GRPO's SDE step with its Gaussian log-probability.

    std = η·sqrt(σ/(1−σ)), μ = x + [v + std²/(2σ)·(x + (1−σ)·v)]·dt with dt < 0,
    x' = μ + std·sqrt(−dt)·ε. Give ``noise`` (ε) to sample, or ``prev_sample`` to score a given x'
    (the RL ratio). At σ = 1 the 1/(1−σ) is taken at σ_next, as Flow-GRPO does with sigmas[1].
    Returns (x', log_prob [B], mean, std·sqrt(−dt)); log_prob is the mean over all but the batch dim.
    """
    x32, v32 = x.to(torch.float32), v.to(torch.float32)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    dt = s_next - s
    denom_sigma = torch.where(s >= 1, s_next, s)
    std = eta * torch.sqrt(s / (1 - denom_sigma))
    mean = x32 * (1 + std**2 / (2 * s) * dt) + v32 * (1 + std**2 * (1 - s) / (2 * s)) * dt
    scale = std * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            raise ValueError("sde_step needs either noise (to sample) or prev_sample (to score)")
        prev_sample = mean + scale * noise.to(torch.float32)
    return prev_sample, gaussian_log_prob(prev_sample, mean, scale), mean, scale


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, scale²) per element, averaged over all but the batch dim → [B] (fp32)."""
    s32 = sample.detach().to(torch.float32)
    log_prob = -((s32 - mean) ** 2) / (2 * scale**2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """neg + s·(cond − neg), then each token rescaled to the norm of the cond prediction."""
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    comb_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / comb_norm)


def noise_latents(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_σ = σ·noise + (1−σ)·x0: the forward process (img2img start and training inputs)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device)
    while s.ndim and s.ndim < x0.ndim:
        s = s.unsqueeze(-1)
    return (s * noise.to(torch.float32) + (1 - s) * x0.to(torch.float32)).to(x0.dtype)


@dataclass(frozen=True)
class DenoiseStep:
    """One step of `denoise_steps`: what the sampler shows and what an RL rollout keeps."""

    index: int  # position in the schedule (0-based)
    step: int  # 1-based among the steps this run takes
    total: int  # steps this run takes
    sigma: float
    sigma_next: float
    timestep: torch.Tensor  # σ·1000, as handed to the model
    x: torch.Tensor  # latents before the step [N, L, C]
    velocity: torch.Tensor  # the model's (guided) velocity at x
    x_next: torch.Tensor  # latents after the step
    log_prob: torch.Tensor | None  # [N]: log-density of x_next under the SDE step; None on an ODE step

    @property
    def x0(self) -> torch.Tensor:
        """The clean-image estimate after this step (fp32): x_next − σ_next·v, or x_next at the end."""
        x = self.x_next.float()
        return x - self.sigma_next * self.velocity.float() if self.sigma_next > 0 else x


def denoise_steps(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    schedule: Schedule,
    *,
    start: int = 0,
    sde: range = range(0),
    eta: float = 0.7,
    generators: Sequence[torch.Generator] = (),
) -> Iterator[DenoiseStep]:
    """The one denoising loop: sampling, previews and RL rollouts all iterate it.

    ``velocity(x, timestep)`` is the model call (CFG included); steps ``start``… of ``schedule`` run,
    those whose run-relative index lies in ``sde`` (and whose σ_next > 0, so no fresh noise is left in
    the image) take `sde_step` with noise ε drawn per image from ``generators`` (CPU, fp32, one
    generator per row of ``x``), the others `euler_step`.
    """
    total = len(schedule) - start
    for n, i in enumerate(range(start, len(schedule))):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        timestep = schedule.timesteps[i]
        v = velocity(x, timestep)
        log_prob = None
        if n in sde and sigma_next > 0:
            eps = torch.cat([torch.randn(x.shape[1:], generator=g, dtype=torch.float32)[None] for g in generators])
            x_next, _, mean, scale = sde_step(x, v, sigma, sigma_next, eta=eta, noise=eps.to(x.device))
            x_next = x_next.to(v.dtype)
            # Scored after the cast, so a policy equal to the rollout's gives a ratio of exactly 1.
            log_prob = gaussian_log_prob(x_next, mean, scale)
        else:
            x_next = euler_step(x, v, sigma, sigma_next)
        yield DenoiseStep(i, n + 1, total, float(sigma), float(sigma_next), timestep, x, v, x_next, log_prob)
        x = x_next
