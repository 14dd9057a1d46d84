"""Render the pack's registry icon, ``icon.png``, with ShapeCompose (run once; the PNG is committed).

    .venv/bin/python assets/icon/make_icon.py

Three objects on the sky-and-grass background, drawn as the built-in model's training scenes are. The registry
wants a square of at most 400 px, given in pyproject.toml [tool.comfy] Icon as a URL. The icon has its own
folder because nodes/examples.py copies every assets/*.png into ComfyUI's input folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT))

from training.tasks.shapecompose import render_scene  # noqa: E402

SIDE = 256
OBJECTS = [  # (shape, colour, centre as fractions of the side, size as a fraction of the side)
    ("circle", "red", (0.29, 0.34), 0.36),
    ("star", "yellow", (0.71, 0.30), 0.40),
    ("triangle", "blue", (0.50, 0.80), 0.32),
]


def main() -> None:
    objects = [
        {"shape": s, "colour": c, "centre": [round(x * SIDE), round(y * SIDE)], "size": round(f * SIDE)}
        for s, c, (x, y), f in OBJECTS
    ]
    out = Path(__file__).resolve().parent / "icon.png"
    render_scene("blue_green", objects, SIDE).save(out, optimize=True)
    print("wrote", out.relative_to(ROOT))


if __name__ == "__main__":
    main()
