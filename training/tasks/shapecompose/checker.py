"""Programmatic checker for ShapeCompose outputs: an RL reward that is hard to fool.

`score(image, sample_or_spec)` returns `Scores`, every field in [0, 1]:

- ``per_reference``: one score per reference.
  Object reference: its object is in its slot with the right shape, colour and size, with a solid
  body, sitting on the expected background (a pasted reference crop with its own background fails).
  Background reference: the output's background matches it, counted only as the background OF a
  composition (x min(1, 2 x mean object score)), so an empty background cannot collect it.
  Single-image edit (K = 1): the scene AS EDITED: edit done x rest preserved (0.8 min + 0.2 mean of
  the kept objects x background); a move or remove also needs the old place emptied.
- ``instruction``: the whole instruction: (0.8 min + 0.2 mean) of the object scores x background x
  clean (no foreground where the spec wants none, no junk beside an object in its box).
- ``quality``: cheap cleanliness / sharpness: pixels explained as background, expected object colours or
  their antialiased mixes, and object edges about as crisp as rendered ones. Spec-aware, not gating.
- ``overall``: (mean per-reference + instruction) / 2 x (0.75 + 0.25 quality).
- ``background`` (raw background match) and ``objects`` / ``details`` (every term) for diagnostics.

How: the output is resized to the spec's size and converted to CIE Lab. The expected background is
rendered exactly from its name; backgrounds vary only with y, so it is corrected row by row toward the
output's own where that is within BG_TRUST (tints, a soft horizon), and the per-pixel colour distance
to it segments the foreground. In every expected object's box the main 8-connected component is taken
(specks and junk ignored, junk charged to ``clean``), refined by each pixel's coverage along
background -> the component's median colour (a blur-stable contour), cropped at its bounding box,
normalised to a 32 x 32 square (aspect kept) and compared by soft IoU with templates of every shape
passed through the same steps: the right shape must win with a margin. Colour: median Lab of the
solid interior; the nearest named colour must be the expected one and within COL_OK..COL_BAD.
Position: centroid against the slot centre; size: bounding box against the template's; solidity:
mean edge width (sum c(1-c) / total variation). Each term is a clipped linear ramp (partial, smooth
credit) and an object's score is their product. About 5 ms per 128 px image on one CPU core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from .scenes import COLOUR_LAB, COLOUR_NAMES, SHAPES, render_background, shape_alpha, srgb_to_lab

F = 32  # normalised mask side for shape matching

# Thresholds (CIE76 dE in Lab). Objects keep >= 40 from their background by construction.
FG_LO, FG_HI = 8.0, 25.0  # foreground membership ramps from FG_LO to FG_HI away from the expected background
BG_OK, BG_BAD = 10.0, 25.0  # a background pixel matches fully below BG_OK, not at all above BG_BAD
COL_OK, COL_BAD = 10.0, 20.0  # object colour: full credit within COL_OK of the named colour, none past COL_BAD
IOU_LO, IOU_HI, IOU_MARGIN = 0.55, 0.8, 0.08
POS_OK, POS_BAD = 0.3, 0.7  # centroid offset as a fraction of the box half-size
SIZE_OK, SIZE_BAD = np.log(1.15), np.log(1.4)  # |log(size ratio)|
BGFRAC_LO, BGFRAC_HI = 0.7, 0.95
LOCAL_BG_BAD, LOCAL_BG_OK = 0.4, 0.8  # share of an object's box around it that shows the expected background
BG_TRUST = 20.0  # segmentation follows the output's background where it is within this of the expected
CLEAN_OK, CLEAN_BAD = 0.05, 0.4  # extra foreground mass, in units of the smallest expected object's area
# edge width (px at 128 px image size): the object score needs a solid body (SOLID_*), quality a crisp edge
SOLID_OK, SOLID_BAD = 1.2, 2.5
EDGE_OK, EDGE_BAD = 0.3, 1.0


def _dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Dot product over a last axis of 3 (broadcasting; faster than einsum / sum(-1) here)."""
    return x[..., 0] * y[..., 0] + x[..., 1] * y[..., 1] + x[..., 2] * y[..., 2]


def _len(x: np.ndarray) -> np.ndarray:
    """Euclidean length over a last axis of 3."""
    return np.sqrt(_dot(x, x))


def _ramp(x, lo, hi):
    """0 at lo, 1 at hi (either order), linear between, clipped."""
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


@dataclass
class Scores:
    per_reference: list
    instruction: float
    quality: float
    overall: float
    background: float = 0.0  # raw background match (not gated)
    objects: list = field(default_factory=list)  # per expected object: its terms
    details: dict = field(default_factory=dict)

    @property
    def per_reference_mean(self) -> float:
        return float(np.mean(self.per_reference)) if self.per_reference else 0.0


# ----------------------------------------------------------------------------------------------
# Cached references: backgrounds and shape templates
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _bg_lab(name: str, size: int) -> np.ndarray:
    lab = srgb_to_lab(np.asarray(render_background(name, size, size)))
    lab.setflags(write=False)
    return lab


def _bbox(mask: np.ndarray):
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


MAX_RUNS = 1500  # past this many foreground runs in a box it is noise: skip the component search


def _main_component(binary: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The 8-connected component of `binary` with the largest `weight` mass (run-length union-find)."""
    h, w = binary.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = binary
    dif = np.diff(padded, axis=1)
    sr, sc = np.nonzero(dif == 1)
    er, ec = np.nonzero(dif == -1)
    n = len(sr)
    if n <= 1 or n > MAX_RUNS:
        return binary.copy()
    rows, starts, ends = sr.tolist(), sc.tolist(), ec.tolist()
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    cur_row, cur_first, prev_lo, prev_hi = -2, 0, 0, 0
    for i in range(n):
        r = rows[i]
        if r != cur_row:
            prev_lo, prev_hi = (cur_first, i) if r == cur_row + 1 else (i, i)
            cur_row, cur_first = r, i
        s, e = starts[i], ends[i]
        for j in range(prev_lo, prev_hi):
            if starts[j] <= e and s <= ends[j]:  # overlapping or diagonally touching
                a, b = find(i), find(j)
                if a != b:
                    parent[a] = b
    roots = np.array([find(i) for i in range(n)])
    cs = np.zeros((h, w + 1), np.float64)
    np.cumsum(weight, axis=1, out=cs[:, 1:])
    mass = cs[sr, ec] - cs[sr, sc]
    best = int(np.argmax(np.bincount(roots, weights=mass, minlength=n)))
    out = np.zeros((h, w), bool)
    for i in np.flatnonzero(roots == best).tolist():
        out[rows[i], starts[i] : ends[i]] = True
    return out


def _dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Binary dilation by a (2r+1) x (2r+1) square (separable)."""
    h = mask.copy()
    for k in range(1, r + 1):
        h[:, k:] |= mask[:, :-k]
        h[:, :-k] |= mask[:, k:]
    out = h.copy()
    for k in range(1, r + 1):
        out[k:] |= h[:-k]
        out[:-k] |= h[k:]
    return out


def _normalise(soft: np.ndarray, bb) -> np.ndarray:
    """Crop the square of side max(w, h) centred on bb (zero padded) and resize to F x F."""
    x0, y0, x1, y1 = bb
    side = max(x1 - x0, y1 - y0)
    cx2, cy2 = x0 + x1, y0 + y1  # twice the centre
    sx0, sy0 = (cx2 - side) // 2, (cy2 - side) // 2
    h, w = soft.shape
    out = np.zeros((side, side), np.float32)
    ax0, ay0, ax1, ay1 = max(sx0, 0), max(sy0, 0), min(sx0 + side, w), min(sy0 + side, h)
    out[ay0 - sy0 : ay1 - sy0, ax0 - sx0 : ax1 - sx0] = soft[ay0:ay1, ax0:ax1]
    return np.asarray(Image.fromarray(out, "F").resize((F, F), Image.Resampling.BILINEAR), np.float32)


@lru_cache(maxsize=2048)
def _template(shape: str, s: int):
    """(normalised mask, measured size, area) of a shape drawn at size s."""
    alpha = np.asarray(shape_alpha(shape, s), np.float32) / 255.0
    pad = np.zeros((s + 4, s + 4), np.float32)
    pad[2:-2, 2:-2] = alpha
    bb = _bbox(pad >= 0.5)
    norm = _normalise(pad, bb)
    norm.setflags(write=False)
    return norm, max(bb[2] - bb[0], bb[3] - bb[1]), float(alpha.sum())


@lru_cache(maxsize=256)
def _templates(s: int) -> np.ndarray:
    t = np.stack([_template(sh, s)[0] for sh in SHAPES])
    t.setflags(write=False)
    return t


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def _spec_of(x) -> dict:
    if hasattr(x, "spec"):
        return x.spec
    if isinstance(x, dict) and "spec" in x and "objects" not in x:
        return x["spec"]
    return x


def _prepare(image: Image.Image, size: int) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        big = image.width > size or image.height > size
        image = image.resize((size, size), Image.Resampling.BOX if big else Image.Resampling.BILINEAR)
    return np.asarray(image)


def _score_object(o: dict, lab, bg, d, soft) -> dict:
    """Terms of one expected object, from the foreground inside its box. Also returns the box's junk mass."""
    x0, y0, x1, y1 = (int(v) for v in o["box"])
    s = int(o["size"])
    _, tmpl_size, tmpl_area = _template(o["shape"], s)
    out = {
        "shape": o["shape"],
        "colour": o["colour"],
        "slot": o.get("slot"),
        "present": 0.0,
        "colour_score": 0.0,
        "shape_score": 0.0,
        "position": 0.0,
        "size_score": 0.0,
        "sharpness": 0.0,
        "score": 0.0,
    }
    sb = soft[y0:y1, x0:x1]
    binary = sb >= 0.5
    if not binary.any():
        return out, 0.0
    comp = _main_component(binary, sb)
    lb = lab[y0:y1, x0:x1]
    bgb = bg[y0:y1, x0:x1]
    # refine: coverage of each pixel along background -> the object's own solid colour (blur-stable 0.5 contour)
    core = comp & (sb >= 0.999)
    n_core = int(core.sum())
    near = _dilate(comp, 2)
    if n_core:
        inner = core.copy()  # prefer pixels whose 4-neighbours are solid too (edge colours bleed)
        inner[1:] &= core[:-1]
        inner[:-1] &= core[1:]
        inner[:, 1:] &= core[:, :-1]
        inner[:, :-1] &= core[:, 1:]
        med = np.median(lb[inner if inner.sum() >= 8 else core], axis=0)
        dirv = med[None, None, :] - bgb
        cov = np.clip(_dot(lb - bgb, dirv) / np.maximum(_dot(dirv, dirv), 1e-6), 0.0, 1.0)
        ob = np.where(near, cov, 0.0).astype(np.float32)
        mask = ob >= 0.5
        if mask.any():
            comp = _main_component(mask, ob)
    else:
        ob = np.where(near, sb, 0.0).astype(np.float32)
    bb = _bbox(comp)
    around2 = _dilate(comp, 2)
    around3 = _dilate(around2, 1)
    junk = float(sb[binary & ~around3].sum())
    out["present"] = 1.0
    # shape: soft IoU against every template, normalised the same way
    norm = _normalise(ob, bb)
    tm = _templates(s)
    ious = np.minimum(tm, norm).sum((1, 2)) / np.maximum(np.maximum(tm, norm).sum((1, 2)), 1e-6)
    i = SHAPES.index(o["shape"])
    best_other = float(np.max(np.delete(ious, i)))
    out["iou"], out["best_other_iou"] = float(ious[i]), best_other
    out["best_shape"] = SHAPES[int(np.argmax(ious))]
    out["shape_score"] = _ramp(ious[i], IOU_LO, IOU_HI) * _ramp(ious[i] - best_other, 0.0, IOU_MARGIN)
    # size: the bounding box against the template's
    meas = max(bb[2] - bb[0], bb[3] - bb[1])
    out["measured_size"] = meas
    out["size_score"] = _ramp(abs(np.log(meas / tmpl_size)), SIZE_BAD, SIZE_OK)
    # position: soft centroid against the expected centre
    mass = float(ob.sum())
    cx = float(ob.sum(0) @ np.arange(x0, x1)) / mass + 0.5
    cy = float(ob.sum(1) @ np.arange(y0, y1)) / mass + 0.5
    hw, hh = (x1 - x0) / 2, (y1 - y0) / 2
    err = max(abs(cx - o["centre"][0]) / hw, abs(cy - o["centre"][1]) / hh)
    out["centroid"] = [cx, cy]
    out["position"] = _ramp(err, POS_BAD, POS_OK)
    # colour: median Lab of the solid pixels
    if n_core:
        dists = np.linalg.norm(COLOUR_LAB - med, axis=1)
        j = COLOUR_NAMES.index(o["colour"])
        out["measured_colour"] = COLOUR_NAMES[int(np.argmin(dists))]
        out["colour_de"] = float(dists[j])
        ok = out["measured_colour"] == o["colour"]
        out["colour_score"] = (_ramp(dists[j], COL_BAD, COL_OK) if ok else 0.0) * _ramp(n_core, 0.0, 0.25 * tmpl_area)
    # sharpness: mean edge width in px (sum of c(1-c) over total variation of the coverage c; ~0.2 for an
    # antialiased edge, ~0.6 sigma for a Gaussian blur of sigma); blur-invariant denominators, no shape bias.
    if n_core:
        cm = cov * around3
        tv = float(np.abs(np.diff(cm, axis=0)).sum() + np.abs(np.diff(cm, axis=1)).sum())
        width = float((cm * (1.0 - cm)).sum()) / max(tv, 1e-6) * (128.0 / soft.shape[0])
        out["edge_width"] = width
        out["sharpness"] = _ramp(width, EDGE_BAD, EDGE_OK)
        out["solidity"] = _ramp(width, SOLID_BAD, SOLID_OK)
    else:
        out["solidity"] = 0.0
    # the object must sit on the expected background (not pasted with its reference's background)
    ring = ~around2
    out["local_background"] = (
        float(np.clip((BG_BAD - d[y0:y1, x0:x1][ring]) / (BG_BAD - BG_OK), 0, 1).mean()) if ring.any() else 1.0
    )
    out["on_background"] = _ramp(out["local_background"], LOCAL_BG_BAD, LOCAL_BG_OK)
    out["score"] = (
        out["colour_score"]
        * out["shape_score"]
        * out["position"]
        * out["size_score"]
        * out["solidity"]
        * out["on_background"]
    )
    return out, junk


def _box_mask(size, boxes) -> np.ndarray:
    m = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in boxes:
        m[int(y0) : int(y1), int(x0) : int(x1)] = True
    return m


def _exclusion(size, objects) -> np.ndarray:
    """Squares around expected objects that the background test skips (objects may sit a bit off)."""
    boxes = []
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        half = min((1.3 * o["size"] + 6) / 2, (x1 - x0) / 2 - 1, (y1 - y0) / 2 - 1)
        cx, cy = o["centre"]
        boxes.append((max(0, round(cx - half)), max(0, round(cy - half)), round(cx + half), round(cy + half)))
    return _box_mask(size, boxes)


def _strong(soft: np.ndarray) -> np.ndarray:
    """Foreground mass of pixels that are >= half foreground and have >= 2 such 8-neighbours (no specks)."""
    b = soft >= 0.5
    p = np.pad(b, 1).astype(np.int8)
    h, w = b.shape
    nb = sum(p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
    return np.where(b & (nb >= 2), soft, 0.0)


def _observed_background(lab, bg_exp, region) -> np.ndarray:
    """The expected background corrected row by row toward the output's own (backgrounds vary only
    with y): mean of the row's expected-background pixels that lie within BG_TRUST of the expected
    colours of rows y-3..y+3 (so a soft or slightly moved horizon is followed too). Absorbs tints, drifts
    and blur up to BG_TRUST for segmentation; a different background stays foreground."""
    h = lab.shape[0]
    rows = bg_exp[:, 0, :]
    idx = np.arange(h)
    a = rows[np.clip(idx - 3, 0, h - 1)][:, None, :]
    ab = rows[np.clip(idx + 3, 0, h - 1)][:, None, :] - a
    la = lab - a
    t = np.clip(_dot(la, ab) / np.maximum(_dot(ab, ab), 1e-6), 0.0, 1.0)
    resid = _len(la - t[..., None] * ab)
    wgt = (region & (resid < BG_TRUST)).astype(np.float32)
    n = wgt.sum(1)
    delta = np.einsum("hwc,hw->hc", lab - bg_exp, wgt)
    total = float(n.sum())
    glob = delta.sum(0) / total if total else np.zeros(3, np.float32)
    row = np.where((n >= 4)[:, None], delta / np.maximum(n, 1)[:, None], glob[None, :])
    return bg_exp + row[:, None, :].astype(np.float32)


def _quality(lab, bg, spec, objs) -> float:
    step = 2
    p = lab[::step, ::step].reshape(-1, 3)
    b = bg[::step, ::step].reshape(-1, 3)
    cols = sorted({o["colour"] for o in spec["objects"]})
    C = np.stack([COLOUR_LAB[COLOUR_NAMES.index(c)] for c in cols]) if cols else np.zeros((0, 3), np.float32)
    diff = p - b
    resid = _len(diff)
    if len(C):
        dirv = C[None, :, :] - b[:, None, :]
        t = np.clip(_dot(diff[:, None, :], dirv) / np.maximum(_dot(dirv, dirv), 1e-6), 0, 1)
        r = _len(diff[:, None, :] - t[..., None] * dirv).min(1)
        resid = np.minimum(resid, r)
    mud = float(np.mean(resid > 15.0))
    cleanliness = _ramp(mud, 0.2, 0.02)
    sharp = [o["sharpness"] for o in objs if o["present"]]
    return cleanliness * (float(np.mean(sharp)) if sharp else 1.0)


def score(image: Image.Image, sample_or_spec) -> Scores:
    """Score an output image (any size, resized to the spec's size) against a ShapeCompose spec."""
    spec = _spec_of(sample_or_spec)
    size = int(spec["size"])
    lab = srgb_to_lab(_prepare(image, size))
    bg_exp = _bg_lab(spec["background"], size)
    objects = spec["objects"]
    region = ~_exclusion(size, objects)  # where the background must show
    d_exp = _len(lab - bg_exp)
    bg = _observed_background(lab, bg_exp, region)
    d = _len(lab - bg)
    soft = np.clip((d - FG_LO) / (FG_HI - FG_LO), 0.0, 1.0)

    scored = [_score_object(o, lab, bg, d, soft) for o in objects]
    objs = [x[0] for x in scored]
    junk = sum(x[1] for x in scored)
    obj_scores = np.array([o["score"] for o in objs], float)
    areas = [_template(o["shape"], int(o["size"]))[2] for o in objects]
    min_area = min(areas) if areas else 0.1 * size * size

    # background: the expected-background pixels match the expected background
    match = np.clip((BG_BAD - d_exp[region]) / (BG_BAD - BG_OK), 0.0, 1.0)
    bg_frac = float(match.mean()) if match.size else 1.0
    bg_score = _ramp(bg_frac, BGFRAC_LO, BGFRAC_HI)
    # nothing where nothing should be: solid foreground outside every expected object's box,
    # plus foreground inside a box apart from its object
    strong = _strong(soft)
    empty = ~_box_mask(size, [o["box"] for o in objects])
    extra = float(strong[empty].sum()) + junk
    clean = _ramp(extra, CLEAN_BAD * min_area, CLEAN_OK * min_area)

    if len(obj_scores):
        obj_term = 0.8 * float(obj_scores.min()) + 0.2 * float(obj_scores.mean())
        mean_obj = float(obj_scores.mean())
    else:
        obj_term = mean_obj = 1.0
    instruction = obj_term * bg_score * clean

    details = {"bg_fraction": bg_frac, "clean": clean, "extra_mass": extra, "object_term": obj_term}
    refs = spec["references"]
    per_ref = []
    edit = spec.get("edit")
    if edit is None:  # compose
        for i, r in enumerate(refs):
            if r["role"] == "background":
                per_ref.append(bg_score * min(1.0, 2.0 * mean_obj))
            else:
                per_ref.append(float(np.mean([o["score"] for o, e in zip(objs, objects) if e["ref"] == i])))
    else:
        op = edit["op"]

        def blend(scores):  # everything the edit must keep: the weakest counts most
            return 0.8 * min(scores) + 0.2 * float(np.mean(scores)) if scores else 1.0

        def emptied(o):  # an object's former box (where no expected object is) is background again
            area = _template(o["shape"], int(o["size"]))[2]
            left = float(strong[_box_mask(size, [o["box"]]) & empty].sum())
            return _ramp(left, CLEAN_BAD * area, CLEAN_OK * area)

        scene = refs[0].get("objects", [])
        if op == "remove":
            done = emptied(edit["removed"])
            rest = blend(list(obj_scores)) * bg_score
        elif op == "background":
            done = bg_score
            rest = blend(list(obj_scores))
        else:
            e = int(edit["object"])
            done = objs[e]["score"]
            if op == "move" and e < len(scene):
                done *= emptied(scene[e])
            rest = blend([o["score"] for i, o in enumerate(objs) if i != e]) * bg_score
        details.update({"edit_done": done, "preserved": rest})
        per_ref = [done * rest]
    quality = _quality(lab, bg, spec, objs)
    mean_ref = float(np.mean(per_ref)) if per_ref else 0.0
    overall = 0.5 * (mean_ref + instruction) * (0.75 + 0.25 * quality)
    return Scores(
        [float(v) for v in per_ref],
        float(instruction),
        float(quality),
        float(overall),
        background=bg_score,
        objects=objs,
        details=details,
    )


def main(argv=None) -> int:
    """``python -m training.checker IMAGE SPEC.json``: print the scores of IMAGE against a spec as JSON."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m training.checker", description=main.__doc__.split(":")[0])
    p.add_argument("image", help="output image to score")
    p.add_argument("spec", help="ShapeCompose spec (JSON): a manifest row's 'spec', or assets/example_spec.json")
    a = p.parse_args(argv)
    try:
        with Image.open(a.image) as im:
            image = im.convert("RGB")
        with open(a.spec, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = score(image, spec.get("spec", spec))
    print(
        json.dumps(
            {
                "per_reference": s.per_reference,
                "per_reference_mean": s.per_reference_mean,
                "instruction": s.instruction,
                "quality": s.quality,
                "overall": s.overall,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
