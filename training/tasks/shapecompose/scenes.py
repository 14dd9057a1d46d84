"""ShapeCompose: a synthetic multi-reference editing task for training tiny Qwen-Image-Edit models.

Every sample is deterministic from an integer seed. A sample is a list of reference images (each its
own size), an instruction naming "Picture k" for every reference, the target image (``size`` x
``size``), and a machine-readable ``spec`` that `checker.score` scores any output against.

Kinds
-----
- ``compose``: K = 1..8 references. An object reference shows ONE object (shape x colour) on its own
  background, at its own size and aspect ratio; optionally (K >= 2) one reference is a background
  reference (a background, no object). The target puts each object in a named slot of a
  deterministic layout for n objects, on the background reference's background or a named one.
  Object size in the target is normalised by the layout.
- single-image edits, K = 1: the reference is a ``size`` x ``size`` scene of 1-2 objects on a
  background; the target is the edited scene: ``recolour``, ``move``, ``resize``, ``remove`` (only from
  2-object scenes), ``background`` (change the background).

Splits use disjoint seed ranges (`SPLIT_SEED_BASE`), so train / val / test never share a sample.
Training uses K in `K_TRAIN` (1..6); K = 7, 8 (`K_EVAL`) are held out for evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart")

#: Object colours (sRGB). Pairwise CIE76 distance >= 42 so the nearest named colour is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (30, 100, 230),
    "yellow": (245, 215, 40),
    "orange": (245, 135, 30),
    "purple": (130, 30, 140),
    "cyan": (40, 200, 215),
    "pink": (245, 130, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}


@dataclass(frozen=True)
class Background:
    name: str
    style: str  # "flat" | "split" (horizon: top colour above HORIZON, bottom below) | "gradient" (vertical)
    top: tuple[int, int, int]
    bottom: tuple[int, int, int]
    phrase: str  # words used in instructions: "a {phrase} background"


HORIZON = 0.6  # split backgrounds: fraction of the height that is the top colour

_SKY, _GRASS, _EARTH = (150, 190, 235), (95, 150, 75), (125, 95, 65)
BACKGROUNDS: dict[str, Background] = {
    b.name: b
    for b in (
        Background("gray", "flat", (128, 128, 128), (128, 128, 128), "gray"),
        Background("white", "flat", (236, 236, 236), (236, 236, 236), "white"),
        Background("black", "flat", (30, 30, 30), (30, 30, 30), "black"),
        Background("brown", "flat", (112, 80, 52), (112, 80, 52), "brown"),
        Background("blue_green", "split", _SKY, _GRASS, "blue and green"),
        Background("blue_brown", "split", _SKY, _EARTH, "blue and brown"),
        Background("blue_white", "gradient", (80, 130, 215), (236, 240, 248), "blue to white"),
        Background("black_gray", "gradient", (20, 20, 30), (120, 120, 128), "black to gray"),
    )
}

#: Compose slot layouts: n objects -> slot names, in instruction order. Grid cells are defined below.
_GRID3 = {  # 3 x 3 grid: (column, row)
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "centre": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
SLOT_LAYOUTS: dict[int, tuple[str, ...]] = {
    1: ("centre",),
    2: ("left", "right"),
    3: ("left", "centre", "right"),
    4: ("top left", "top right", "bottom left", "bottom right"),
    5: ("top left", "top right", "centre", "bottom left", "bottom right"),
    6: ("top left", "top", "top right", "bottom left", "bottom", "bottom right"),
    7: ("top left", "top", "top right", "centre", "bottom left", "bottom", "bottom right"),
    8: ("top left", "top", "top right", "left", "right", "bottom left", "bottom", "bottom right"),
}
SLOTS: tuple[str, ...] = tuple(_GRID3)

#: Edit scenes: object centres at these fractions of the image (column / row 0, 1, 2).
EDIT_POS_FRAC = (0.22, 0.5, 0.78)

EDIT_KINDS: tuple[str, ...] = ("recolour", "move", "resize", "remove", "background")
KINDS: tuple[str, ...] = ("compose",) + EDIT_KINDS
K_MAX = 8
#: Compositions: "reading" puts the objects into the layout's slots in picture order (Picture 1 in the
#: first slot: left, or top left) and a background reference, if any, is the last picture; "free"
#: assigns slots at random and puts the background reference anywhere, so only the instruction's words
#: tell which picture goes where. The built-in model trains on "reading": its text encoder is a tiny
#: frozen random Qwen2.5-VL, and binding "Picture 2" to the word "left" through it was not learned in
#: the recipe's CPU budget (three runs); picture order is read from the frame index of each reference.
#: "anchored" is "reading" with every reference fixed in form, the task the built-in model ships on: each
#: object centred in its reference at `ANCHORED_OBJECT_FRAC` of the side on a flat background, and at K ≥ 2
#: always a background reference as the last picture (K − 1 objects). Under SELF at the default budget an
#: object then arrives at about the size its slot asks for (K = 2, 3 with 96 px references at budget 128²),
#: so composing is a copy per picture index, which a 6-layer model learns on 2 CPU cores; with "reading"
#: it placed blobs but did not bind pictures to slots in 1,400 steps (training/README.md).
COMPOSE_ORDERS: tuple[str, ...] = ("reading", "free", "anchored")
ANCHORED_OBJECT_FRAC = (0.5, 0.6)
K_TRAIN: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
K_EVAL: tuple[int, ...] = (7, 8)
SPLIT_SEED_BASE = {"train": 0, "val": 5_000_000, "test": 10_000_000}
SPLIT_SEED_SPAN = 5_000_000
RESIZE_FACTORS = {"bigger": 1.45, "smaller": 0.65}
# An object reference shows its object large, as a subject photo does: the object's side is this share of
# the reference's shorter side. At small budgets (K = 6 shares 128² px) smaller objects shrink below one
# 16 px latent token and a tiny model cannot learn to find them.
REF_OBJECT_FRAC = (0.6, 0.85)
MIN_CONTRAST = 40.0  # CIE76 distance every object colour keeps from every colour of its background


# ----------------------------------------------------------------------------------------------
# Colour science (shared with the checker)
# ----------------------------------------------------------------------------------------------

_SRGB_LUT = np.array(
    [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in np.arange(256) / 255.0],
    dtype=np.float32,
)
_RGB2XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
    dtype=np.float32,
)
_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)


def srgb_to_lab(rgb) -> np.ndarray:
    """uint8 sRGB array (..., 3) -> CIE L*a*b* float32 (..., 3), D65."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    lin = _SRGB_LUT[rgb]
    xyz = (lin @ (_RGB2XYZ.T / _WHITE[None, :]).astype(np.float32)).astype(np.float32)
    d = 6.0 / 29.0
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4.0 / 29.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
COLOUR_LAB = srgb_to_lab(np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.uint8))


def _bg_colours(name: str, n: int = 16) -> np.ndarray:
    b = BACKGROUNDS[name]
    t = np.linspace(0, 1, n)[:, None]
    return np.concatenate([np.array([b.top], float), np.array([b.bottom], float), (1 - t) * b.top + t * b.bottom])


@cache
def compatible_colours(background: str) -> tuple[str, ...]:
    """Object colours that stay >= MIN_CONTRAST (CIE76) from every colour of this background."""
    bg = srgb_to_lab(_bg_colours(background))
    d = np.linalg.norm(COLOUR_LAB[:, None, :] - bg[None, :, :], axis=-1).min(axis=1)
    return tuple(c for c, dist in zip(COLOUR_NAMES, d) if dist >= MIN_CONTRAST)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

_SS = 4  # supersampling factor for antialiased shapes


def _star(points=5, inner=0.45):
    pts = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / points
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart(n=96):
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x, -y))
    return pts


def _cross(arm=0.34):
    a, b = 0.5 - arm / 2, 0.5 + arm / 2
    return [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]


def _fit_unit(pts):
    """Scale a polygon so its bounding box is exactly the unit square."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts]


_POLYGONS = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "star": _fit_unit(_star()),
    "cross": _cross(),
    "heart": _fit_unit(_heart()),
}
RING_INNER = 0.55  # ring: inner radius / outer radius


@lru_cache(maxsize=4096)
def _shape_alpha_cached(shape: str, w: int, h: int) -> bytes:
    W, H = w * _SS, h * _SS
    m = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(m)
    box = (0, 0, W - 1, H - 1)
    if shape in ("circle", "ring"):
        d.ellipse(box, fill=255)
        if shape == "ring":
            ix, iy = (W - 1) * (1 - RING_INNER) / 2, (H - 1) * (1 - RING_INNER) / 2
            d.ellipse((ix, iy, W - 1 - ix, H - 1 - iy), fill=0)
    elif shape == "square":
        d.rectangle(box, fill=255)
    elif shape in _POLYGONS:
        d.polygon([(x * (W - 1), y * (H - 1)) for x, y in _POLYGONS[shape]], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return m.resize((w, h), Image.Resampling.BOX).tobytes()


def shape_alpha(shape: str, w: int, h: int | None = None) -> Image.Image:
    """Antialiased coverage mask ('L', w x h) of a shape filling its w x h box."""
    h = w if h is None else h
    return Image.frombytes("L", (w, h), _shape_alpha_cached(shape, int(w), int(h)))


def render_background(name: str, w: int, h: int) -> Image.Image:
    """A named background at any size (described relative to the image, so it scales exactly)."""
    b = BACKGROUNDS[name]
    top, bottom = np.array(b.top, np.float64), np.array(b.bottom, np.float64)
    if b.style == "flat":
        rows = np.repeat(top[None], h, 0)
    elif b.style == "split":
        rows = np.where((np.arange(h) < round(h * HORIZON))[:, None], top[None], bottom[None])
    elif b.style == "gradient":
        t = ((np.arange(h) + 0.5) / h)[:, None]
        rows = (1 - t) * top[None] + t * bottom[None]
    else:  # pragma: no cover - guarded by BACKGROUNDS
        raise ValueError(b.style)
    arr = np.repeat(np.rint(rows).astype(np.uint8)[:, None, :], w, axis=1)
    return Image.fromarray(arr, "RGB")


def draw_object(canvas: Image.Image, shape: str, colour: str, centre, size: int) -> None:
    """Draw an antialiased `size` x `size` object centred (to the pixel) at `centre`, in place."""
    s = int(size)
    x0, y0 = int(round(centre[0] - s / 2)), int(round(centre[1] - s / 2))
    canvas.paste(COLOURS[colour], (x0, y0, x0 + s, y0 + s), shape_alpha(shape, s))


def render_scene(background: str, objects, w: int, h: int | None = None) -> Image.Image:
    """Background + objects (dicts with shape, colour, centre, size)."""
    h = w if h is None else h
    img = render_background(background, w, h)
    for o in objects:
        draw_object(img, o["shape"], o["colour"], o["centre"], o["size"])
    return img


def render_target(spec: dict) -> Image.Image:
    """The target image a spec describes (ground truth; also used to build test adversaries)."""
    return render_scene(spec["background"], spec["objects"], spec["size"])


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------


def _grid_cell(size: int, cols: int, rows: int, col: int, row: int):
    x0, x1 = round(size * col / cols), round(size * (col + 1) / cols)
    y0, y1 = round(size * row / rows), round(size * (row + 1) / rows)
    return [x0, y0, x1, y1]


def slot_layout(n: int, size: int = 128) -> list[dict]:
    """Deterministic slots for n compose objects: name, box [x0, y0, x1, y1], centre, object size."""
    if n not in SLOT_LAYOUTS:
        raise ValueError(f"compose supports 1..{K_MAX} objects, got {n}")
    names = SLOT_LAYOUTS[n]
    out = []
    for name in names:
        col, row = _GRID3[name]
        if n == 1:
            box = [0, 0, size, size]
        elif n in (2, 3):  # one row, full height
            col = names.index(name)
            box = _grid_cell(size, n, 1, col, 0)
        elif n == 4:
            box = _grid_cell(size, 2, 2, col // 2, row // 2)
        elif n == 6:
            box = _grid_cell(size, 3, 2, col, row // 2)
        else:
            box = _grid_cell(size, 3, 3, col, row)
        cw, ch = box[2] - box[0], box[3] - box[1]
        s = int(round(min(0.68 * min(cw, ch), 0.41 * size)))
        out.append({"slot": name, "box": box, "centre": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], "size": s})
    return out


def _edit_centre(pos: str, size: int):
    col, row = _GRID3[pos]
    return [round(EDIT_POS_FRAC[col] * size), round(EDIT_POS_FRAC[row] * size)]


def _edit_box(centre, s: int, size: int):
    """Checker box of an edit-scene object: a square around it (>= one third of the image)."""
    half = max(size / 6, 0.7 * s)
    x0, y0 = max(0, round(centre[0] - half)), max(0, round(centre[1] - half))
    x1, y1 = min(size, round(centre[0] + half)), min(size, round(centre[1] + half))
    return [x0, y0, x1, y1]


def _far_apart(p: str, q: str) -> bool:
    (a, b), (c, d) = _GRID3[p], _GRID3[q]
    return max(abs(a - c), abs(b - d)) >= 2


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------


@dataclass
class Sample:
    references: list  # list[PIL.Image.Image], RGB, each its own size
    instruction: str
    target: Image.Image  # RGB, size x size
    kind: str
    k: int
    spec: dict = field(default_factory=dict)
    seed: int | None = None


def _choice(rng, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def _phrase(o) -> str:
    return f"{o['colour']} {o['shape']}"


def _slot_phrase(slot: str) -> str:
    if slot in ("left", "right"):
        return f"on the {slot}"
    if slot == "centre":
        return "in the centre"
    return f"at the {slot}"


def _bg_phrase(name: str) -> str:
    return f"a {BACKGROUNDS[name].phrase} background"


def _ref_dims(rng, lo: int, hi: int, ref_side: int | None) -> tuple[int, int]:
    """A reference's (w, h): random in [lo, hi] per side, or ``ref_side`` square (the draws are made either
    way, so the rest of a sample is the same for the same seed)."""
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    return (w, h) if ref_side is None else (int(ref_side), int(ref_side))


def _make_compose(
    rng, k: int, size: int, order: str = "reading", ref_side: int | None = None
) -> tuple[list, str, dict]:
    anchored = order == "anchored"
    has_bg_ref = k >= 2 and (rng.random() < 0.35 or anchored)
    n = k - int(has_bg_ref)
    if not has_bg_ref:
        bg_index = None
    else:
        bg_index = int(rng.integers(k)) if order == "free" else k - 1
    target_bg = _choice(rng, BACKGROUNDS)
    colours = compatible_colours(target_bg)
    pairs = set()
    while len(pairs) < n:
        pairs.add((_choice(rng, SHAPES), _choice(rng, colours)))
    pairs = sorted(pairs)
    pairs = [pairs[i] for i in rng.permutation(n)]
    obj_refs = [i for i in range(k) if i != bg_index]
    layout = slot_layout(n, size)
    # object j (reference obj_refs[j]) goes to layout[slot_of_obj[j]]
    slot_of_obj = rng.permutation(n) if order == "free" else np.arange(n)

    lo, hi = round(64 * size / 128), round(160 * size / 128)
    references, ref_specs = [None] * k, [None] * k
    for j, ri in enumerate(obj_refs):
        shape, colour = pairs[j]
        w, h = _ref_dims(rng, lo, hi, ref_side)
        bgs = [b for b in BACKGROUNDS if b != target_bg and colour in compatible_colours(b)]
        if anchored:
            bgs = [b for b in bgs if BACKGROUNDS[b].style == "flat"] or bgs
        rbg = _choice(rng, bgs)
        lo_frac, hi_frac = ANCHORED_OBJECT_FRAC if anchored else REF_OBJECT_FRAC
        s = int(round(min(w, h) * rng.uniform(lo_frac, hi_frac)))
        cx = rng.uniform(s / 2 + 2, w - s / 2 - 2)
        cy = rng.uniform(s / 2 + 2, h - s / 2 - 2)
        if anchored:
            cx, cy = w / 2, h / 2
        o = {"shape": shape, "colour": colour, "centre": [round(cx), round(cy)], "size": s}
        references[ri] = render_scene(rbg, [o], w, h)
        ref_specs[ri] = {
            "role": "object",
            "shape": shape,
            "colour": colour,
            "background": rbg,
            "width": w,
            "height": h,
            "object": o,
        }
    if has_bg_ref:
        w, h = _ref_dims(rng, lo, hi, ref_side)
        references[bg_index] = render_background(target_bg, w, h)
        ref_specs[bg_index] = {"role": "background", "background": target_bg, "width": w, "height": h}

    objects = []
    for j, ri in enumerate(obj_refs):
        slot = layout[slot_of_obj[j]]
        shape, colour = pairs[j]
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "slot": slot["slot"],
                "box": slot["box"],
                "centre": slot["centre"],
                "size": slot["size"],
                "ref": ri,
            }
        )
    objects.sort(key=lambda o: SLOT_LAYOUTS[n].index(o["slot"]))
    clauses = [f"the object from Picture {o['ref'] + 1} {_slot_phrase(o['slot'])}" for o in objects]
    if len(clauses) == 1:
        body = clauses[0]
    elif len(clauses) == 2:
        body = f"{clauses[0]} and {clauses[1]}"
    else:
        body = ", ".join(clauses[:-1]) + f" and {clauses[-1]}"
    where = f"on the background of Picture {bg_index + 1}" if has_bg_ref else f"on {_bg_phrase(target_bg)}"
    instruction = f"Put {body}, {where}."
    spec = {
        "kind": "compose",
        "size": size,
        "background": target_bg,
        "objects": objects,
        "references": ref_specs,
        "edit": None,
    }
    return references, instruction, spec


def edit_object(shape: str, colour: str, pos: str, s: int, size: int) -> dict:
    """An object of an edit scene: ``shape`` in ``colour``, ``s`` px, centred on the edit grid's place ``pos``
    (a name of `SLOTS`) of a ``size`` px square scene."""
    c = _edit_centre(pos, size)
    return {"shape": shape, "colour": colour, "slot": pos, "centre": c, "size": int(s), "box": _edit_box(c, s, size)}


def _make_edit(rng, kind: str, size: int) -> tuple[list, str, dict]:
    n = 2 if kind == "remove" else int(rng.integers(1, 3))
    bg = _choice(rng, BACKGROUNDS)
    new_bg = None
    if kind == "background":
        new_bg = _choice(rng, [b for b in BACKGROUNDS if b != bg])
    colours = [c for c in compatible_colours(bg) if new_bg is None or c in compatible_colours(new_bg)]
    shapes = list(rng.permutation(len(SHAPES)))[:n]
    cols = list(rng.permutation(len(colours)))[:n]
    if n == 1:
        positions = [_choice(rng, SLOTS)]
    else:
        far = [(p, q) for p in SLOTS for q in SLOTS if p < q and _far_apart(p, q)]
        positions = list(_choice(rng, far))
        if rng.random() < 0.5:
            positions.reverse()
    base = [int(round(rng.uniform(30, 36) * size / 128)) for _ in range(n)]
    scene = [edit_object(SHAPES[shapes[i]], colours[cols[i]], positions[i], base[i], size) for i in range(n)]
    reference = render_scene(bg, scene, size)
    e = int(rng.integers(n))  # the edited object
    obj = scene[e]
    name = _phrase(obj)
    target_objs = [dict(o) for o in scene]
    target_bg = bg
    edit: dict = {"op": kind, "object": e}
    if kind == "recolour":
        others = {(o["shape"], o["colour"]) for o in scene}
        choices = [c for c in compatible_colours(bg) if c != obj["colour"] and (obj["shape"], c) not in others]
        new = _choice(rng, choices)
        target_objs[e]["colour"] = new
        edit.update({"from": obj["colour"], "to": new})
        instruction = f"Recolour the {name} in Picture 1 to {new}."
    elif kind == "move":
        taken = [o["slot"] for i, o in enumerate(scene) if i != e]
        choices = [p for p in SLOTS if p != obj["slot"] and all(_far_apart(p, t) for t in taken)]
        to = _choice(rng, choices)
        target_objs[e] = edit_object(obj["shape"], obj["colour"], to, obj["size"], size)
        edit.update({"from": obj["slot"], "to": to})
        instruction = f"Move the {name} in Picture 1 to the {to}."
    elif kind == "resize":
        way = _choice(rng, RESIZE_FACTORS)
        s = int(round(obj["size"] * RESIZE_FACTORS[way]))
        target_objs[e] = edit_object(obj["shape"], obj["colour"], obj["slot"], s, size)
        edit.update({"direction": way, "from_size": obj["size"], "to_size": s})
        instruction = f"Make the {name} in Picture 1 {way}."
    elif kind == "remove":
        removed = target_objs.pop(e)
        edit.update({"removed": removed})
        edit["object"] = None
        instruction = f"Remove the {name} from Picture 1."
    elif kind == "background":
        target_bg = new_bg
        edit.update({"from": bg, "to": new_bg, "object": None})
        instruction = f"Change the background of Picture 1 to {_bg_phrase(new_bg)}."
    else:  # pragma: no cover
        raise ValueError(kind)
    for o in target_objs:
        o["ref"] = 0
    ref_spec = {"role": "scene", "background": bg, "width": size, "height": size, "objects": scene}
    spec = {
        "kind": kind,
        "size": size,
        "background": target_bg,
        "objects": target_objs,
        "references": [ref_spec],
        "edit": edit,
    }
    return [reference], instruction, spec


def make_sample(
    seed: int,
    k: int | None = None,
    kind: str | None = None,
    size: int = 128,
    order: str = "reading",
    ref_side: int | None = None,
) -> Sample:
    """One sample, deterministic from (seed, k, kind, size, order, ref_side).

    kind: "compose", an edit kind (see EDIT_KINDS), "edit" (any edit) or None (compose or edit,
    half each when K = 1 is allowed). k: number of references; edits need k = 1; compose allows
    1..8; None draws k from K_TRAIN for compose. order: see `COMPOSE_ORDERS`. ref_side: compose
    references are ``ref_side`` px squares instead of 64–160 px a side at random (then every
    composition of one K has one SELF layout, so training batches many samples per forward pass).
    """
    if ref_side is not None and not 32 <= int(ref_side) <= 1024:
        raise ValueError(f"ref_side must be 32..1024 px, got {ref_side}")
    if order not in COMPOSE_ORDERS:
        raise ValueError(f"unknown compose order {order!r}; known: {', '.join(COMPOSE_ORDERS)}")
    if k is not None and not 1 <= int(k) <= K_MAX:
        raise ValueError(f"k must be in 1..{K_MAX}, got {k}")
    if kind is not None and kind not in KINDS and kind != "edit":
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)} or 'edit'")
    if kind in EDIT_KINDS + ("edit",) and k not in (None, 1):
        raise ValueError(f"edit samples have exactly 1 reference, got k={k}")
    rng = np.random.default_rng([int(seed), 0x5C0])
    if kind is None:
        kind = "compose" if (k is not None and k > 1) or rng.random() < 0.5 else "edit"
    if kind == "edit":
        kind = _choice(rng, EDIT_KINDS)
    if kind == "compose":
        k = int(k) if k is not None else int(_choice(rng, K_TRAIN))
        refs, instruction, spec = _make_compose(rng, k, size, order, ref_side)
    else:
        k = 1
        refs, instruction, spec = _make_edit(rng, kind, size)
    spec["seed"] = int(seed)
    return Sample(refs, instruction, render_target(spec), kind, k, spec, int(seed))


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLIT_SEED_BASE)}")
    if start < 0 or start + n > SPLIT_SEED_SPAN:
        raise ValueError(f"split {split!r} holds {SPLIT_SEED_SPAN} seeds")
    base = SPLIT_SEED_BASE[split]
    return list(range(base + start, base + start + n))


def make_split(
    split: str,
    n: int,
    *,
    ks=None,
    kinds=None,
    size: int = 128,
    start: int = 0,
    order: str = "reading",
    ref_side: int | None = None,
) -> list[Sample]:
    """n samples of a split. ks: allowed K (default K_TRAIN for train/val, 1..8 for test);
    kinds: allowed kinds (default all); ref_side: see `make_sample`. Sample i uses seed
    SPLIT_SEED_BASE[split] + start + i."""
    if ks is None:
        ks = tuple(range(1, K_MAX + 1)) if split == "test" else K_TRAIN
    ks = tuple(ks)
    kinds = tuple(kinds) if kinds is not None else KINDS
    out = []
    for seed in split_seeds(split, n, start):
        rng = np.random.default_rng([seed, 0x5B1])
        kind = _choice(rng, kinds)
        if kind != "compose" and 1 not in ks:
            kind = "compose"
        k = 1 if kind != "compose" else int(_choice(rng, ks))
        out.append(make_sample(seed, k=k, kind=kind, size=size, order=order, ref_side=ref_side))
    return out


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def write_manifest(samples, out_dir, name: str = "manifest.jsonl") -> Path:
    """Write images as PNG under out_dir/images/ and one JSONL row per sample; returns the manifest path.

    Row: {"references": [paths], "instruction", "target": path, "task": kind, "k", "spec", "seed"};
    paths are relative to the manifest's folder.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    with path.open("w", encoding="utf-8") as f:
        for i, s in enumerate(samples):
            tag = f"{i:06d}" if s.seed is None else f"{i:06d}_{s.seed}"
            refs = []
            for j, r in enumerate(s.references):
                rel = f"images/{tag}_ref{j + 1}.png"
                r.save(out_dir / rel)
                refs.append(rel)
            tgt = f"images/{tag}_target.png"
            s.target.save(out_dir / tgt)
            row = {
                "references": refs,
                "instruction": s.instruction,
                "target": tgt,
                "task": s.kind,
                "k": s.k,
                "spec": s.spec,
                "seed": s.seed,
            }
            f.write(json.dumps(row) + "\n")
    return path


def read_manifest(path) -> list[Sample]:
    """Load samples written by write_manifest (images loaded as RGB)."""
    path = Path(path)
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)

        def load(rel):
            with Image.open(path.parent / rel) as im:
                return im.convert("RGB")

        out.append(
            Sample(
                [load(r) for r in row["references"]],
                row["instruction"],
                load(row["target"]),
                row["task"],
                int(row["k"]),
                row["spec"],
                row.get("seed"),
            )
        )
    return out
