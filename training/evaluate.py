"""Evaluation during SFT: sample validation edits with the in-training weights, grid them, score them.

Sampling is ``UniRefPipeline.edit`` itself, built around the live transformer (``Components`` with the
training transformer swapped in), so what is evaluated is exactly what inference would produce.
ShapeCompose rows (a ``spec`` with objects) are scored by ``training.checker.score``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from uniref_core.images import load_image
from uniref_core.model import Components
from uniref_core.pipeline import UniRefPipeline

from .checker import score
from .config import SFTConfig, Stage
from .data import Row, target_dims
from .logging_utils import make_grid

SCORE_FIELDS = ("per_reference_mean", "instruction", "quality", "overall")


def _scores(image: Image.Image, spec: dict | None) -> dict | None:
    if not spec or "objects" not in spec or "size" not in spec:
        return None  # not a ShapeCompose row: nothing to check against
    s = score(image, spec)
    return {"per_reference_mean": s.per_reference_mean, "instruction": s.instruction, "quality": s.quality,
            "overall": s.overall}  # fmt: skip


def evaluate(components: Components, transformer, rows: list[Row], stage: Stage, cfg: SFTConfig, seed: int = 0):
    """(grid image, per-sample records, mean scores or {}) for the first ``cfg.eval_samples`` rows."""
    pipe = UniRefPipeline(dataclasses.replace(components, transformer=transformer))
    grid_rows, records = [], []
    was_training = transformer.training
    transformer.eval()
    try:
        for i, row in enumerate(rows[: cfg.eval_samples]):
            width, height = target_dims(row.target_size, stage)
            result = pipe.edit(
                [str(p) for p in row.references], row.instruction, seed=seed + i, steps=cfg.eval_steps,
                cfg=cfg.eval_cfg, mode="budget", budget=stage.budget, upscale=cfg.upscale,
                vl_budget=cfg.vl_budget, width=width, height=height,
            )  # fmt: skip
            pred = result.images[0]
            refs = [load_image(p) for p in row.references]
            grid_rows.append((refs, load_image(row.target), pred))
            records.append({"row": row.where, "k": row.k, "task": row.task, "scores": _scores(pred, row.spec)})
    finally:
        transformer.train(was_training)
    scored = [r["scores"] for r in records if r["scores"]]
    means = {k: float(np.mean([s[k] for s in scored])) for k in SCORE_FIELDS} if scored else {}
    captions = [f"{r['row']} K={r['k']}" + (f" overall {r['scores']['overall']:.2f}" if r["scores"] else "")
                for r in records]  # fmt: skip
    return make_grid(grid_rows, captions=captions), records, means
