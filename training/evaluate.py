"""Evaluation: during SFT (validation rows, in-training weights) and of finished models (held-out split).

    python -m training.evaluate --model default --split test --refs 1-6 --n 24 --seed 0 [--grid eval.png]

The CLI makes ``--n`` ShapeCompose compositions per K (K references each, from the split's own seeds),
plus ``--edits`` single-image edits of each kind, edits them with the model at its own defaults (``uniref.json``) or
the options given, scores every output with the ShapeCompose checker and prints per-K means as JSON:
``per_reference`` (each reference's object: right shape, colour and place), ``instruction``,
``quality`` and ``overall``; a PNG grid shows the first ``--grid-rows`` samples of every K.

Sampling is ``UniRefPipeline.edit`` itself, built around the live transformer (``Components`` with the
training transformer swapped in), so what is evaluated is exactly what inference would produce.
ShapeCompose rows (a ``spec`` with objects) are scored by ``training.tasks.shapecompose.score``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from uniref_core.budget import parse_area
from uniref_core.defaults import default_model_path, resolve_model_arg
from uniref_core.errors import UniRefError
from uniref_core.images import load_image
from uniref_core.model import Components
from uniref_core.pipeline import UniRefPipeline, resolve_setting

from .common.cli import exit_on_error
from .common.data import Row
from .common.logging_utils import make_grid
from .tasks.shapecompose import COMPOSE_ORDERS, EDIT_KINDS, K_MAX, SPLIT_SEED_BASE, make_split, score

if TYPE_CHECKING:  # the SFT trainer imports this module: a run-time import of training.sft would be circular
    from .sft.config import SFTConfig

SCORE_FIELDS = ("per_reference_mean", "instruction", "quality", "overall")


def _scores(image: Image.Image, spec: dict | None) -> dict | None:
    if not spec or "objects" not in spec or "size" not in spec:
        return None  # not a ShapeCompose row: nothing to check against
    s = score(image, spec)
    return {
        "per_reference_mean": s.per_reference_mean,
        "instruction": s.instruction,
        "quality": s.quality,
        "overall": s.overall,
    }


def evaluate(components: Components, transformer, rows: list[Row], conds: list, cfg: SFTConfig, seed: int = 0):
    """(grid image, per-sample records, mean scores or {}) for the first rows, one per conditioning in ``conds``
    (the rows encoded for the stage before the text encoder left: `training.sft.trainer.encode_eval_rows`)."""
    pipe = UniRefPipeline(dataclasses.replace(components, transformer=transformer))
    grid_rows, records = [], []
    was_training = transformer.training
    transformer.eval()
    try:
        for i, (row, cond) in enumerate(zip(rows, conds)):
            latents = pipe.sample(cond, seed=seed + i, steps=cfg.eval_steps, cfg=cfg.eval_cfg)
            pred = pipe.decode(latents, cond.width, cond.height)[0]
            refs = [load_image(p) for p in row.references]
            grid_rows.append((refs, load_image(row.target), pred))
            records.append({"row": row.where, "k": row.k, "task": row.task, "scores": _scores(pred, row.spec)})
    finally:
        transformer.train(was_training)
    scored = [r["scores"] for r in records if r["scores"]]
    means = {k: float(np.mean([s[k] for s in scored])) for k in SCORE_FIELDS} if scored else {}
    captions = [
        f"{r['row']} K={r['k']}" + (f" overall {r['scores']['overall']:.2f}" if r["scores"] else "") for r in records
    ]
    return make_grid(grid_rows, captions=captions), records, means


# --------------------------------------------------------------------------------------------------
# Finished models on a held-out split (the CLI)
# --------------------------------------------------------------------------------------------------

#: Seeds of K's samples start at K · SEED_STRIDE inside the split, so adding a K never changes another's; the
#: edits of the j-th kind of `EDIT_KINDS` start at (EDIT_START + j) · SEED_STRIDE.
SEED_STRIDE = 100_000
EDIT_START = K_MAX + 1


def held_out_groups(
    split: str,
    ks: list[int],
    n: int,
    edits: int = 0,
    size: int | Callable[[int], int] = 128,
    ref_side: int | None = None,
    order: str = "reading",
) -> list[tuple[str, list]]:
    """The samples `evaluate_model` scores, as (group, samples): ``n`` compositions per K (group "K"), then
    ``edits`` single-image edits of each kind (group "edit:<kind>"), ``size`` px square targets (or ``size(K)``,
    edits having K = 1). `training.vae.reconstruction_ceiling` scores the VAE on the very same targets."""
    side = size if callable(size) else lambda k: size
    groups = [
        (
            str(k),
            make_split(
                split,
                n,
                ks=(k,),
                kinds=("compose",),
                start=k * SEED_STRIDE,
                size=side(k),
                ref_side=ref_side,
                order=order,
            ),
        )
        for k in ks
    ]
    for j, kind in enumerate(EDIT_KINDS if edits else ()):
        start = (EDIT_START + j) * SEED_STRIDE
        groups.append((f"edit:{kind}", make_split(split, edits, kinds=(kind,), start=start, size=side(1))))
    return groups


def parse_refs(text: str) -> list[int]:
    """'1-6' → [1..6]; '1,3,7' → [1, 3, 7]; each K in 1..K_MAX."""
    ks: list[int] = []
    try:
        for part in str(text).split(","):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                ks += list(range(lo, hi + 1))
            elif part.strip():
                ks.append(int(part))
    except ValueError:
        raise UniRefError(f"--refs {text!r} is not a list of K: write 1-6 or 1,2,7") from None
    bad = [k for k in ks if not 1 <= k <= K_MAX]
    if not ks or bad:
        raise UniRefError(f"--refs {text!r}: every K must be in 1..{K_MAX}")
    return sorted(set(ks))


def _mean_scores(scored: list[dict]) -> dict:
    out = {"n": len(scored)}
    for key in ("per_reference", "per_reference_min", "instruction", "quality", "overall"):
        out[key] = round(float(np.mean([s[key] for s in scored])), 4) if scored else None
    return out


def sample_size(pipe: UniRefPipeline, size: int | None = None, references: int = 1) -> int:
    """ShapeCompose target side to evaluate at: ``size``, else the side of the output area the model was trained
    for with ``references`` references (``uniref.json``), else 128."""
    if size is not None:
        return int(size)
    d = pipe.c.defaults
    if "output_area" not in d and not d.get("by_references"):
        return 128
    return int(round(math.sqrt(resolve_setting("output_area", None, d, references))))


def _trained_shapecompose(model) -> dict:
    path = Path(model) / "uniref.json"
    return (json.loads(path.read_text()).get("shapecompose") or {}) if path.is_file() else {}


def trained_ref_side(model) -> int | None:
    """The square reference side the model's ShapeCompose data used (``uniref.json`` "shapecompose"), or None."""
    side = _trained_shapecompose(model).get("ref_side")
    return int(side) if side else None


def trained_order(model) -> str:
    """The compose order the model's ShapeCompose data used (``uniref.json`` "shapecompose"; "reading" if unset)."""
    order = _trained_shapecompose(model).get("order") or "reading"
    if order not in COMPOSE_ORDERS:
        raise UniRefError(
            f"{Path(model) / 'uniref.json'}: shapecompose order {order!r} is unknown; "
            f"use one of {', '.join(COMPOSE_ORDERS)}"
        )
    return order


def evaluate_model(
    model,
    split: str,
    ks: list[int],
    n: int,
    seed: int = 0,
    edits: int = 0,
    grid_path=None,
    grid_rows: int = 2,
    device: str = "cpu",
    progress: bool = False,
    size: int | None = None,
    ref_side: int | None = -1,
    order: str | None = None,
    **options,
) -> dict:
    """Edit and score ``n`` compositions per K (and ``edits`` single-image edits of each kind); mean scores.

    Samples are ``size`` px square (default: the model's trained output size, see `sample_size`); their
    references are ``ref_side`` px squares (-1, the default: as the model was trained, `trained_ref_side`;
    None: 64–160 px a side at random); ``order``: the compose order (None: as the model was trained, `trained_order`).
    ``options`` go to ``UniRefPipeline.edit`` (steps, cfg, budget, …); unset ones take the model's defaults.
    Returns {"model", "split", "seed", "size", "options", "per_k": {K: means}, "seconds"}, with edits also
    "edit_kinds": {kind: means} and "edit": the means of all edits. An edit's per-reference score is the
    checker's edit score: the edit done x the rest of the scene kept.
    """
    t0 = time.perf_counter()
    pipe = UniRefPipeline.from_pretrained(model, device=device, dtype="fp32")
    sides = {k: sample_size(pipe, size, k) for k in {1, *ks}}
    if ref_side == -1:
        ref_side = trained_ref_side(model)
    order = order or trained_order(model)
    groups = held_out_groups(split, ks, n, edits, sides.__getitem__, ref_side, order)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(g) for _, g in groups), desc="evaluate", disable=not progress, file=sys.stderr)
    result: dict = {
        "model": str(model),
        "split": split,
        "seed": seed,
        "size": sides[1] if len(set(sides.values())) == 1 else {str(k): v for k, v in sorted(sides.items())},
        "ref_side": ref_side,
        "order": order,
        "options": options,
        "per_k": {},
    }
    grid, captions, edit_scores = [], [], []
    for name, samples in groups:
        scored = []
        for i, s in enumerate(samples):
            out = pipe.edit(
                s.references,
                s.instruction,
                seed=seed + i,
                mode="budget",
                width=s.target.width,
                height=s.target.height,
                **options,
            ).images[0]
            sc = score(out, s.spec)
            # per_reference_min: the weakest reference of the sample (what MSGRPO's "min" aggregation lifts)
            scored.append(
                {
                    "per_reference": sc.per_reference_mean,
                    "per_reference_min": min(sc.per_reference, default=0.0),
                    "instruction": sc.instruction,
                    "quality": sc.quality,
                    "overall": sc.overall,
                }
            )
            if i < grid_rows:
                grid.append((s.references, s.target, out))
                captions.append(f"K={s.k} {s.kind} seed {s.seed}: overall {sc.overall:.2f}")
            bar.update(1)
        if name.startswith("edit:"):
            result.setdefault("edit_kinds", {})[name.split(":", 1)[1]] = _mean_scores(scored)
            edit_scores += scored
        else:
            result["per_k"][name] = _mean_scores(scored)
    bar.close()
    if edit_scores:
        result["edit"] = _mean_scores(edit_scores)
    if grid_path is not None and grid:
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        make_grid(grid, captions=captions).save(grid_path)
        result["grid"] = str(grid_path)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


@exit_on_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default="default",
        help="'default' (the built-in model), a built-in name (uniref-default-sft) or a model folder",
    )
    p.add_argument("--split", default="test", choices=sorted(SPLIT_SEED_BASE))
    p.add_argument("--refs", default="1-6", help="numbers of references K: 1-6, or 1,2,7 …")
    p.add_argument("--n", type=int, default=16, help="compositions per K")
    p.add_argument(
        "--edits",
        type=int,
        default=0,
        help="single-image edits of each kind (recolour, move, resize, remove, background) to add",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first sample of every K")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="true-CFG scale (default: the model's)")
    p.add_argument("--budget", default=None, help="reference budget, e.g. 256 for 256² (default: the model's)")
    p.add_argument("--size", type=int, default=None, help="sample side in px (default: the model's output size)")
    p.add_argument(
        "--ref-side",
        type=int,
        default=-1,
        help="compositions' references: squares of this side; 0: "
        "64-160 px a side at random (default: as the model was trained, uniref.json)",
    )
    p.add_argument(
        "--order",
        choices=COMPOSE_ORDERS,
        default=None,
        help="compositions' order (default: as the model was trained, uniref.json; else reading)",
    )
    p.add_argument("--grid", default="eval_grid.png", help="PNG grid of samples ('' for none)")
    p.add_argument("--grid-rows", type=int, default=2, help="samples per K in the grid")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if not 1 <= a.n <= SEED_STRIDE - 1:
        p.error(f"--n {a.n}: give 1..{SEED_STRIDE - 1}")
    ks = parse_refs(a.refs)
    model = default_model_path() if a.model == "default" else resolve_model_arg(a.model)
    options = {k: v for k, v in (("steps", a.steps), ("cfg", a.cfg)) if v is not None}
    if a.budget is not None:
        options["budget"] = parse_area(a.budget)
    if a.size is not None and not 32 <= a.size <= 2048:
        p.error(f"--size {a.size}: give a side of 32..2048 px")
    result = evaluate_model(
        model,
        a.split,
        ks,
        a.n,
        a.seed,
        a.edits,
        a.grid or None,
        a.grid_rows,
        a.device,
        progress=True,
        size=a.size,
        ref_side=a.ref_side or None,
        order=a.order,
        **options,
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
