"""ShapeCompose: the synthetic multi-reference task (`scenes`), its checker (`checker`, the RL reward) and its
manifest writer (`make`). Imports uniref_core, numpy and PIL only, never the trainers.

    python -m training.make_shapecompose --out data/shapecompose --train 4000 --val 64 --size 128
    python -m training.checker out.png assets/example_spec.json
"""

from .checker import Scores, score
from .make import make_mixture
from .scenes import (
    ANCHORED_OBJECT_FRAC,
    BACKGROUNDS,
    COLOURS,
    COMPOSE_ORDERS,
    EDIT_KINDS,
    K_EVAL,
    K_MAX,
    K_TRAIN,
    KINDS,
    SHAPES,
    SPLIT_SEED_BASE,
    Sample,
    compatible_colours,
    draw_object,
    make_sample,
    make_split,
    read_manifest,
    render_background,
    render_scene,
    render_target,
    slot_layout,
    split_seeds,
    write_manifest,
)

__all__ = [
    "ANCHORED_OBJECT_FRAC",
    "BACKGROUNDS",
    "COLOURS",
    "COMPOSE_ORDERS",
    "EDIT_KINDS",
    "K_EVAL",
    "K_MAX",
    "K_TRAIN",
    "KINDS",
    "SHAPES",
    "SPLIT_SEED_BASE",
    "Sample",
    "Scores",
    "compatible_colours",
    "draw_object",
    "make_mixture",
    "make_sample",
    "make_split",
    "read_manifest",
    "render_background",
    "render_scene",
    "render_target",
    "score",
    "slot_layout",
    "split_seeds",
    "write_manifest",
]
