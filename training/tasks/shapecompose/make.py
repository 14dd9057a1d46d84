"""Write ShapeCompose train / val manifests for SFT.

    python -m training.make_shapecompose --out data/shapecompose --train 4000 --val 64 --size 128

``make_split`` draws the kind uniformly from compose and the five single-image edits, so only ~1/6
of its samples have K > 1. SFT must see every K it promises (a tiny model trained on K = 1…3 did
not compose K = 4), so this writes ``--compose-fraction`` compositions (K drawn from ``--ks``,
default 1…6) and single-image edits for the rest, from disjoint seeds; train and val never share one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .scenes import COMPOSE_ORDERS, EDIT_KINDS, K_TRAIN, make_split, write_manifest


def make_mixture(
    split: str, n: int, compose_fraction: float, ks, size: int, order: str = "reading", ref_side: int | None = None
) -> list:
    n_compose = round(n * compose_fraction)
    compose = make_split(split, n_compose, ks=ks, kinds=("compose",), size=size, order=order, ref_side=ref_side)
    edits = make_split(split, n - n_compose, kinds=EDIT_KINDS, size=size, start=n_compose)
    return compose + edits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.make_shapecompose", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder; train/ and val/ are written inside")
    p.add_argument("--train", type=int, default=4000, help="training samples")
    p.add_argument("--val", type=int, default=64, help="validation samples")
    p.add_argument("--size", type=int, default=128, help="target side in pixels")
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=list(K_TRAIN),
        help="numbers of references in compositions, drawn uniformly from this list (repeat a K to weight it)",
    )
    p.add_argument("--compose-fraction", type=float, default=0.5, help="share of multi-reference compositions")
    p.add_argument(
        "--order",
        choices=COMPOSE_ORDERS,
        default="reading",
        help="compositions: objects in picture order (reading), in slots at random (free), or "
        "reading with fixed references: objects centred, a background reference last (anchored)",
    )
    p.add_argument(
        "--ref-side",
        type=int,
        default=None,
        help="compositions: square references of this side "
        "(one SELF layout per K, so training batches fill) instead of 64-160 px a side at random",
    )
    a = p.parse_args(argv)
    if a.ref_side is not None and not 32 <= a.ref_side <= 1024:
        p.error(f"--ref-side {a.ref_side}: give a side of 32..1024 px")
    if not 0.0 <= a.compose_fraction <= 1.0:
        p.error(f"--compose-fraction is {a.compose_fraction}: give a share between 0 and 1")
    for split, n in (("train", a.train), ("val", a.val)):
        samples = make_mixture(split, n, a.compose_fraction, a.ks, a.size, a.order, a.ref_side)
        path = write_manifest(samples, Path(a.out) / split)
        ks = sorted({s.k for s in samples})
        print(f"{split}: {n} samples (K in {ks}) → {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
