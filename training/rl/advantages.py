"""Group-relative advantages from many reward signals (one group = G images of one prompt).

Aggregations (``aggregation`` in the RL config):
- ``sum``: the paper's baseline: the weighted sum of raw scores, then normalised within the group;
- ``normalized_sum``: each signal normalised within the group first, then the weighted sum (MixGRPO's
  ``advantage_aggr``, GDPO): a signal that barely varies cannot be drowned by one that varies a lot;
- ``min``: the minimum over the per-reference signals (so the weakest reference drives learning) plus the
  weighted non-reference signals, normalised within the group;
- ``product``: mean per-reference × instruction × quality (MICo-Bench's W·SC·PQ), normalised within the group.

Failed images (``RewardBatch.failed``) take no part in their group's statistics; their advantage is NaN.
"""

from __future__ import annotations

import numpy as np

from ..rewards import RewardBatch

AGGREGATIONS = ("sum", "normalized_sum", "min", "product")
STD_EPS = 1e-4  # as Flow-GRPO: (r − mean) / (std + 1e-4)


def normalise(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(v − mean) / (std + ε) over the kept entries; 0 where a group has < 2 kept; NaN where not kept."""
    out = np.full(values.shape, np.nan)
    if keep.sum() < 2:
        out[keep] = 0.0
        return out
    v = values[keep]
    out[keep] = (v - v.mean()) / (v.std() + STD_EPS)
    return out


def total_reward(batch: RewardBatch, weights: dict[str, float], mode: str) -> np.ndarray:
    """The per-image scalar reward ``mode`` normalises (``normalized_sum`` has none: its sum is of z-scores)."""
    sig = batch.signals
    w = {k: weights.get(k, 1.0) for k in sig}
    refs = [k for k, s in sig.items() if s.role == "reference"]
    others = [k for k in sig if k not in refs]
    n = len(next(iter(sig.values())).values)
    if mode == "sum":
        return sum(w[k] * sig[k].values for k in sig)
    if mode == "min":
        out = np.zeros(n)
        if refs:
            out = np.mean([w[k] for k in refs]) * np.min([sig[k].values for k in refs], axis=0)
        return out + sum((w[k] * sig[k].values for k in others), np.zeros(n))
    if mode == "product":
        out = np.mean([sig[k].values for k in refs], axis=0) if refs else np.ones(n)
        for k in others:
            out = out * sig[k].values
        return out
    raise ValueError(f"no scalar total for aggregation {mode!r}")


def group_advantages(batch: RewardBatch, weights: dict[str, float], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(advantage [G], reward [G]) of one group; failed images get NaN in both."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation {mode!r}: use one of {', '.join(AGGREGATIONS)}")
    keep = ~batch.failed
    if mode == "normalized_sum":
        z = {k: normalise(s.values, keep) for k, s in batch.signals.items()}
        adv = sum(weights.get(k, 1.0) * z[k] for k in z)
        reward = sum(weights.get(k, 1.0) * s.values for k, s in batch.signals.items())
    else:
        reward = total_reward(batch, weights, mode)
        adv = normalise(reward, keep)
    reward = np.where(keep, reward, np.nan)
    return adv, reward
