"""The flow-matching objective of SFT, on the target tokens only.

σ ~ sigmoid(N(mean, std)) (logit-normal; a share ``pure_noise`` of draws at σ = 1), x_σ = σ·noise + (1−σ)·x0, the
model predicts the velocity
v = noise − x0 from [x_σ ; ref 1 ; … ; ref K] through ``predict_velocity`` (the one transformer call that
sampling uses too) at timestep σ·1000, and the loss is the MSE on the target tokens.
"""

from __future__ import annotations

import torch

from uniref_core.pipeline import predict_velocity
from uniref_core.sampling import noise_latents

from ..common.seeds import sample_seed
from .config import LogitNormal
from .data import Batch


def draw_noise_and_sigma(seed: int, step: int, slots: list[int], shape, dist: LogitNormal):
    """Per sample: σ from the logit-normal and Gaussian noise of ``shape`` [L, C], fp32 on the CPU."""
    sigmas, noises = [], []
    for slot in slots:
        gen = torch.Generator("cpu").manual_seed(sample_seed(seed, step, slot))
        u = torch.randn((), generator=gen) * dist.std + dist.mean
        sigma = torch.sigmoid(u)
        if dist.pure_noise > 0 and float(torch.rand((), generator=gen)) < dist.pure_noise:
            sigma = torch.ones_like(sigma)
        sigmas.append(sigma)
        noises.append(torch.randn(tuple(shape), generator=gen))
    return torch.stack(noises), torch.stack(sigmas)


def flow_matching_loss(transformer, batch: Batch, noise: torch.Tensor, sigma: torch.Tensor):
    """(mean loss, per-sample loss [b]) of the velocity prediction on the target tokens."""
    x0 = batch.x0
    noise = noise.to(x0.device, x0.dtype)
    sigma = sigma.to(x0.device, torch.float32)
    x_t = noise_latents(x0, noise, sigma)
    target = noise.float() - x0.float()
    pred = predict_velocity(transformer, x_t, sigma * 1000.0, batch.refs, batch.embeds, batch.mask, batch.img_shapes)
    per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2))
    return per_sample.mean(), per_sample
