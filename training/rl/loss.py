"""The clipped-ratio policy objective of Flow-GRPO, per denoising step.

For one SDE step of one image: ratio r = exp(log π_new(x' | x) − log π_old(x' | x)); the loss is
max(−A·r, −A·clip(r, 1 − ε, 1 + ε)) (the PPO form), averaged. With the new policy equal to the old
(r = 1) its gradient is the plain policy gradient −A·∇log π. The optional KL term to the frozen start model
is Flow-GRPO's: ‖μ_new − μ_ref‖² / (2·s²) per element, averaged (s the step's noise scale).
"""

from __future__ import annotations

import torch


def clipped_policy_loss(
    new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict]:
    """(mean loss, stats) over the batch; all tensors [B]."""
    adv = advantages.to(new_log_prob.dtype)
    ratio = torch.exp(new_log_prob - old_log_prob.detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "clip_frac": float(((ratio - 1.0).abs() > clip_range).float().mean()),
        "ratio_dev": float((ratio.detach() - 1.0).abs().max()),
    }
    return loss, stats


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[B]: ‖μ − μ_ref‖² / (2·s²), averaged over all but the batch dim."""
    kl = (mean - ref_mean.detach()) ** 2 / (2 * scale**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
