"""Training rows, for SFT and RL alike: manifest rows checked up front against every stage of a config.

``load_rows``: read JSONL manifests (rows of ``training.tasks.shapecompose.write_manifest``), open every
image, and skip, count and report bad rows (missing or unreadable images, empty instructions, a target
or reference set that some stage cannot take). Training never crashes on a bad row.

``cfg`` below is an SFT or RL config: what is read of it is ``model``, ``stages``, ``upscale``,
``vl_budget`` and ``allow_target_upscale`` (an RL config is one stage, ``RLConfig.stages``).
SFT's encoding and batching of the rows are in ``training.sft.data``.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from uniref_core.budget import TOKEN_PX, Plan, output_size, plan_references
from uniref_core.errors import UniRefError
from uniref_core.images import load_image
from uniref_core.model import token_px_of
from uniref_core.prompt import check_prompt_text

from .config import Stage

# Rows listed one by one in a printed report; the rest are only counted.
REPORT_LINES = 20


@dataclass
class Row:
    """One usable manifest row, with its image sizes read (images are decoded again when encoded)."""

    where: str  # "manifest.jsonl:12"
    references: list[Path]
    instruction: str
    target: Path
    ref_sizes: list[tuple[int, int]]
    target_size: tuple[int, int]
    task: str | None = None
    spec: dict | None = None

    @property
    def k(self) -> int:
        return len(self.references)


@dataclass
class DataReport:
    """What was read, what was skipped and why, and how the usable rows fall into layouts."""

    name: str
    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    k_counts: dict[int, int] = field(default_factory=dict)
    buckets: list[str] = field(default_factory=list)  # one line per stage

    @property
    def usable(self) -> int:
        return self.total - len(self.skipped)

    def summary(self) -> str:
        lines = [f"data report [{self.name}]: {self.total} rows, {self.usable} usable, {len(self.skipped)} skipped"]
        for where, reason in self.skipped[:REPORT_LINES]:
            lines.append(f"  skipped {where}: {reason}")
        if len(self.skipped) > REPORT_LINES:
            lines.append(f"  … and {len(self.skipped) - REPORT_LINES} more skipped rows")
        if self.k_counts:
            lines.append(
                "  references per sample: " + ", ".join(f"K={k}: {n}" for k, n in sorted(self.k_counts.items()))
            )
        lines += [f"  {b}" for b in self.buckets]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "total": self.total,
            "usable": self.usable,
            "skipped": [{"row": w, "reason": r} for w, r in self.skipped],
            "k_counts": self.k_counts,
            "buckets": self.buckets,
        }


@lru_cache(maxsize=16)
def model_token_px(model: str) -> int:
    """Pixels per token side of the model being trained (16 for real checkpoints; read from its configs)."""
    return token_px_of(model)


def target_dims(target_size: tuple[int, int], stage: Stage, token_px: int = TOKEN_PX) -> tuple[int, int]:
    """The size a target is trained at in ``stage``: its own, or its aspect ratio at the stage's area."""
    if stage.output_size is None:
        return target_size
    return output_size([target_size], area=stage.output_size, token_px=token_px)


def plan_row(row: Row, stage: Stage, cfg) -> Plan:
    """The SELF plan of a row in a stage: the one planner, mode "budget", the stage's budget, the model's tokens."""
    token_px = model_token_px(str(cfg.model))
    width, height = target_dims(row.target_size, stage, token_px)
    return plan_references(
        row.ref_sizes,
        "budget",
        stage.budget,
        upscale=cfg.upscale,
        vl_budget=cfg.vl_budget,
        width=width,
        height=height,
        token_px=token_px,
    )


def encode_row(pipe, row: Row, stage: Stage, cfg, guidance: float):
    """A row's SELF conditioning exactly as inference encodes it (``pipe.encode``, mode "budget"): the stage's
    budget, the target's size in the stage, the config's VL budget and upscaling; ``guidance`` > 1 adds the
    negative prompt."""
    width, height = target_dims(row.target_size, stage, pipe.token_px)
    return pipe.encode(
        [str(p) for p in row.references],
        row.instruction,
        cfg=guidance,
        mode="budget",
        budget=stage.budget,
        upscale=cfg.upscale,
        vl_budget=cfg.vl_budget,
        width=width,
        height=height,
    )


def layout_key(plan: Plan) -> tuple:
    """(frames, rows, cols) of the target and of every reference, in order: one RoPE layout.

    diffusers 0.42.1's QwenImageTransformer2DModel builds RoPE from ``img_shapes[0]`` for the whole
    batch, so a batch may only hold samples whose layouts are identical: same K, same token grids.
    """
    return tuple(plan.img_shapes)


def _check_stage_fit(row: Row, stages: list[Stage], cfg) -> str | None:
    """Why some stage cannot train on this row, or None."""
    token_px = model_token_px(str(cfg.model))
    for i, stage in enumerate(stages, start=1):
        tw, th = row.target_size
        if stage.output_size is None:
            if tw % token_px or th % token_px:
                return (
                    f"target is {tw}×{th} px: with no output_size in stage {i} targets train at their own size, "
                    f"which must be a multiple of the model's {token_px} px token on each side; set "
                    "output_size or resize it"
                )
        else:
            ow, oh = target_dims(row.target_size, stage, token_px)
            if not cfg.allow_target_upscale and (tw < ow or th < oh):
                return (
                    f"target is {tw}×{th} px, smaller than stage {i}'s output {ow}×{oh}: it would be upscaled; "
                    "lower output_size or set allow_target_upscale"
                )
        try:
            plan_row(row, stage, cfg)
        except UniRefError as e:
            return f"stage {i} (budget {stage.label}): {e}"
    return None


def _read_image_size(path: Path, name: str) -> tuple[int, int]:
    return load_image(path, name=name).size


def _parse_row(line: str) -> tuple[dict | None, str | None]:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
        return None, f"not valid JSON ({e})"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    refs = row.get("references")
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        return None, "'references' must be a list of image paths"
    if not refs:
        return None, "no references: every row needs at least one reference image"
    if not isinstance(row.get("target"), str):
        return None, "'target' must be an image path"
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return None, "empty instruction"
    try:
        check_prompt_text(instruction, "the instruction")  # refused here, it would stop the encoding pass
    except UniRefError as e:
        return None, str(e)
    return row, None


def load_rows(manifests: list[str], cfg, name: str = "train", workers: int = 4) -> tuple[list[Row], DataReport]:
    """Read, check and report manifest rows; bad rows are skipped and counted, never fatal.

    Paths in a row are relative to its manifest's folder (``write_manifest``'s convention).
    """
    report = DataReport(name)
    parsed = []  # (where, row dict, base)
    for manifest in manifests:
        path = Path(manifest)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UniRefError(
                f"{name} manifest {path} could not be read as UTF-8 text ({e}): check train_manifest / val_manifest"
            ) from e
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            report.total += 1
            row, reason = _parse_row(line)
            if reason:
                report.skipped.append((where, reason))
            else:
                parsed.append((where, row, path.parent))

    def check(item):
        where, row, base = item
        refs = [base / r for r in row["references"]]
        target = base / row["target"]
        try:
            ref_sizes = [
                _read_image_size(p, f"reference {k} ({row['references'][k - 1]})") for k, p in enumerate(refs, 1)
            ]
            target_size = _read_image_size(target, f"target ({row['target']})")
        except UniRefError as e:
            return None, (where, str(e))
        out = Row(where, refs, row["instruction"], target, ref_sizes, target_size, row.get("task"), row.get("spec"))
        reason = _check_stage_fit(out, cfg.stages, cfg)
        return (None, (where, reason)) if reason else (out, None)

    rows = []
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without holding the GIL
        for row, bad in pool.map(check, parsed):
            if bad:
                report.skipped.append(bad)
            else:
                rows.append(row)
    report.k_counts = dict(sorted(Counter(r.k for r in rows).items()))
    for i, stage in enumerate(cfg.stages, start=1):
        sizes = Counter(layout_key(plan_row(r, stage, cfg)) for r in rows).values()
        if sizes:
            report.buckets.append(
                f"stage {i} (budget {stage.label}): {len(sizes)} layouts, largest {max(sizes)} samples, "
                f"{sum(1 for s in sizes if s == 1)} with a single sample"
            )
    return rows, report
