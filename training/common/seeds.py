"""Seeds derived from (run seed, step, slot): the same draws whatever the number of processes, and on resume."""

from __future__ import annotations

import numpy as np


def sample_seed(seed: int, step: int, slot: int) -> int:
    """A generator seed for one slot of one global batch: independent of process count and rank."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(1, np.uint64)[0] >> 1)
