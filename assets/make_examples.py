"""Render the example references shipped with the pack with ShapeCompose (run once; the PNGs are committed).

    .venv/bin/python assets/make_examples.py

This folder is not named examples/: ComfyUI serves the first of examples/, workflows/ … as the pack's
template folder, and our workflows live in workflows/.

A scene to edit (`edit_scene.png`, the single-edit template's Picture 1, with assets/edit_spec.json: the red
circle recoloured to blue, what the template asks for), two object references (each on its own background) and a
background reference, of the kind the built-in model was trained on (squares of
`training.build_default.RECIPE["ref_side"]` px, the object
centred at 0.55 of the side on a flat background: ShapeCompose's "anchored" order) so it knows them, plus
assets/example_spec.json: the ShapeCompose spec
of the composition that scripts/main.sh asks for, so the checker can score out.png
(`python -m training.checker out.png assets/example_spec.json`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT))

from training.build_default import RECIPE  # noqa: E402
from training.tasks.shapecompose import ANCHORED_OBJECT_FRAC, render_background, render_scene, slot_layout  # noqa: E402
from training.tasks.shapecompose.scenes import edit_object  # noqa: E402

SIZE = 128  # the default model's output side
SIDE = RECIPE["ref_side"]  # 96: the side of the square references it was trained on
EDIT_PROMPT = "Recolour the red circle in Picture 1 to blue."
PROMPT = (
    "Put the object from Picture 1 on the left and the object from Picture 2 on the right, "
    "on the background of Picture 3."
)


def main() -> None:
    assets = ROOT / "assets"
    # As in the model's "anchored" training data: centred, at the middle of ANCHORED_OBJECT_FRAC of the side.
    side = round(SIDE * sum(ANCHORED_OBJECT_FRAC) / 2)
    circle = {"shape": "circle", "colour": "red", "centre": [SIDE // 2, SIDE // 2], "size": side}
    # A triangle, not a square: this VAE rounds a 44 px square's corners where they cross the horizon of
    # the split background, so even its reconstruction of the ground truth fails the checker there
    # (training/README.md); circle, triangle and heart come back whole.
    triangle = {"shape": "triangle", "colour": "blue", "centre": [SIDE // 2, SIDE // 2], "size": side}
    render_scene("white", [circle], SIDE, SIDE).save(assets / "ref_red_circle.png")
    render_scene("gray", [triangle], SIDE, SIDE).save(assets / "ref_blue_triangle.png")
    render_background("blue_green", SIDE, SIDE).save(assets / "ref_background.png")
    layout = {s["slot"]: s for s in slot_layout(2, SIZE)}
    objects = [
        {
            "shape": "circle",
            "colour": "red",
            "ref": 0,
            **{k: layout["left"][k] for k in ("slot", "box", "centre", "size")},
        },
        {
            "shape": "triangle",
            "colour": "blue",
            "ref": 1,
            **{k: layout["right"][k] for k in ("slot", "box", "centre", "size")},
        },
    ]
    spec = {
        "kind": "compose",
        "size": SIZE,
        "background": "blue_green",
        "objects": objects,
        "edit": None,
        "instruction": PROMPT,
        "references": [
            {"role": "object", "shape": "circle", "colour": "red", "background": "white"},
            {"role": "object", "shape": "triangle", "colour": "blue", "background": "gray"},
            {"role": "background", "background": "blue_green"},
        ],
    }
    (assets / "example_spec.json").write_text(json.dumps(spec, indent=1) + "\n")
    write_edit_example(assets)
    print("wrote", ", ".join(p.name for p in sorted(assets.iterdir())))


def write_edit_example(assets: Path) -> None:
    """A scene as ShapeCompose's edits draw them (objects of ~34 px at the edit grid's places, 128²) and the spec of
    the template's edit: the red circle recoloured to blue, the green triangle and the background kept."""
    scene = [edit_object("circle", "red", "left", 34, SIZE), edit_object("triangle", "green", "right", 34, SIZE)]
    render_scene("white", scene, SIZE).save(assets / "edit_scene.png")
    target = [dict(o, ref=0) for o in scene]
    target[0]["colour"] = "blue"
    spec = {
        "kind": "recolour",
        "size": SIZE,
        "background": "white",
        "objects": target,
        "instruction": EDIT_PROMPT,
        "references": [{"role": "scene", "background": "white", "width": SIZE, "height": SIZE, "objects": scene}],
        "edit": {"op": "recolour", "object": 0, "from": "red", "to": "blue"},
    }
    (assets / "edit_spec.json").write_text(json.dumps(spec, indent=1) + "\n")


if __name__ == "__main__":
    main()
