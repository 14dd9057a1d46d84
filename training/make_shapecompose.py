"""Write ShapeCompose train / val manifests for SFT.

    python -m training.make_shapecompose --out data/shapecompose --train 4000 --val 64 --size 128

Train and val use disjoint seeds and K in ``K_TRAIN`` (1…6: every K the model should handle is
trained on); ``--ks`` narrows or widens it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .shapecompose import K_TRAIN, make_split, write_manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.make_shapecompose", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder; train/ and val/ are written inside")
    p.add_argument("--train", type=int, default=4000, help="training samples")
    p.add_argument("--val", type=int, default=64, help="validation samples")
    p.add_argument("--size", type=int, default=128, help="target side in pixels")
    p.add_argument("--ks", type=int, nargs="+", default=list(K_TRAIN), help="numbers of references to include")
    a = p.parse_args(argv)
    for split, n in (("train", a.train), ("val", a.val)):
        path = write_manifest(make_split(split, n, ks=a.ks, size=a.size), Path(a.out) / split)
        print(f"{split}: {n} samples → {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
