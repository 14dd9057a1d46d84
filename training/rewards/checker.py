"""The ShapeCompose checker as a reward source: one signal per reference, instruction, quality."""

from __future__ import annotations

import numpy as np

from ..tasks.shapecompose import score
from . import RewardBatch, RewardError, Signal


def checker_source():
    """Scores each image against its row's ShapeCompose spec (`training.tasks.shapecompose.score`)."""

    def source(images, row) -> RewardBatch:
        spec = getattr(row, "spec", None)
        if not spec or "objects" not in spec:
            raise RewardError(
                f"reward source 'checker': row {getattr(row, 'where', '?')} has no ShapeCompose spec; "
                "train on ShapeCompose manifests or use another source"
            )
        scored = [score(im, spec) for im in images]
        k = len(scored[0].per_reference)
        signals = {
            f"ref{i + 1}": Signal(np.array([s.per_reference[i] for s in scored]), "reference", i + 1) for i in range(k)
        }
        signals["instruction"] = Signal(np.array([s.instruction for s in scored]), "instruction")
        signals["quality"] = Signal(np.array([s.quality for s in scored]), "quality")
        return RewardBatch(signals)

    return source
