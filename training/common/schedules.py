"""Learning-rate schedules: a multiplier of the base lr per optimizer step, for
``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def lr_multiplier(steps: int, warmup: int, schedule: str):
    """Warmup (linear from 1/(w+1)) then constant, or cosine to 0 at the last of ``steps``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "cosine":
            progress = (step - warmup) / max(steps - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return f
