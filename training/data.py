"""SFT data: manifest rows checked up front, encoded with the inference code, batched by layout.

1. ``load_rows``: read JSONL manifests (rows of ``training.shapecompose.write_manifest``), open every
   image, and skip, count and report bad rows (missing or unreadable images, empty instructions, a
   target or reference set that some stage cannot take). Training never crashes on a bad row.
2. ``SampleEncoder``: a sample becomes model inputs through the SAME functions ``UniRefPipeline.encode``
   uses (``plan_references`` in mode "budget", ``encode_prompt`` on the VL copies, ``vae_encode`` +
   ``pack_latents``), so training and inference cannot drift apart.
3. ``BucketSampler`` + ``collate``: every batch shares one layout (see ``layout_key``).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from functools import lru_cache

from uniref_core.budget import TOKEN_PX, Plan, output_size, plan_references
from uniref_core.model import token_px_of
from uniref_core.errors import UniRefError
from uniref_core.images import load_image
from uniref_core.latents import pack_latents, to_pixels, vae_encode
from uniref_core.prompt import PromptEmbeds, encode_prompt

from .config import SFTConfig, Stage

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
            lines.append("  references per sample: " + ", ".join(f"K={k}: {n}" for k, n in sorted(self.k_counts.items())))
        lines += [f"  {b}" for b in self.buckets]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"name": self.name, "total": self.total, "usable": self.usable,
                "skipped": [{"row": w, "reason": r} for w, r in self.skipped],
                "k_counts": self.k_counts, "buckets": self.buckets}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# 1. Rows
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def model_token_px(model: str) -> int:
    """Pixels per token side of the model being trained (16 for real checkpoints; read from its configs)."""
    return token_px_of(model)


def target_dims(target_size: tuple[int, int], stage: Stage, token_px: int = TOKEN_PX) -> tuple[int, int]:
    """The size a target is trained at in ``stage``: its own, or its aspect ratio at the stage's area."""
    if stage.output_size is None:
        return target_size
    return output_size([target_size], area=stage.output_size, token_px=token_px)


def plan_row(row: Row, stage: Stage, cfg: SFTConfig) -> Plan:
    """The SELF plan of a row in a stage: the one planner, mode "budget", the stage's budget, the model's tokens."""
    token_px = model_token_px(str(cfg.model))
    width, height = target_dims(row.target_size, stage, token_px)
    return plan_references(row.ref_sizes, "budget", stage.budget, upscale=cfg.upscale, vl_budget=cfg.vl_budget,
                           width=width, height=height, token_px=token_px)  # fmt: skip


def layout_key(plan: Plan) -> tuple:
    """(frames, rows, cols) of the target and of every reference, in order: one RoPE layout.

    diffusers 0.42.1's QwenImageTransformer2DModel builds RoPE from ``img_shapes[0]`` for the whole
    batch, so a batch may only hold samples whose layouts are identical: same K, same token grids.
    """
    return tuple(plan.img_shapes)


def _check_stage_fit(row: Row, stages: list[Stage], cfg: SFTConfig) -> str | None:
    """Why some stage cannot train on this row, or None."""
    token_px = model_token_px(str(cfg.model))
    for i, stage in enumerate(stages, start=1):
        tw, th = row.target_size
        if stage.output_size is None:
            if tw % token_px or th % token_px:
                return (f"target is {tw}×{th} px: with no output_size in stage {i} targets train at their own size, "
                        f"which must be a multiple of the model's {token_px} px token on each side; set "
                        "output_size or resize it")  # fmt: skip
        else:
            ow, oh = target_dims(row.target_size, stage, token_px)
            if not cfg.allow_target_upscale and (tw < ow or th < oh):
                return (f"target is {tw}×{th} px, smaller than stage {i}'s output {ow}×{oh}: it would be upscaled; "
                        "lower output_size or set allow_target_upscale")  # fmt: skip
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
    except ValueError as e:
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
    return row, None


def load_rows(manifests: list[str], cfg: SFTConfig, name: str = "train", workers: int = 4) -> tuple[list[Row], DataReport]:
    """Read, check and report manifest rows; bad rows are skipped and counted, never fatal.

    Paths in a row are relative to its manifest's folder (``write_manifest``'s convention).
    """
    report = DataReport(name)
    parsed = []  # (where, row dict, base)
    for manifest in manifests:
        path = Path(manifest)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UniRefError(f"{name} manifest {path} could not be read ({e}): check train_manifest / val_manifest")
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
            ref_sizes = [_read_image_size(p, f"reference {k} ({row['references'][k - 1]})") for k, p in enumerate(refs, 1)]
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


# --------------------------------------------------------------------------------------------------
# 2. Encoding
# --------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A sample's latents at one stage, on the CPU: packed target and reference tokens and the layout."""

    x0: torch.Tensor  # [1, L, 64]
    refs: list[torch.Tensor]  # [1, L_k, 64] each
    img_shapes: list[tuple[int, int, int]]
    plan: Plan


class SampleEncoder:
    """Encodes rows exactly as ``UniRefPipeline.encode`` does, with optional CPU caches."""

    def __init__(self, components, cfg: SFTConfig):
        self.c = components
        self.cfg = cfg
        self._prompts: dict[tuple, PromptEmbeds] = {}
        self._latents: dict[tuple[int, int], Encoded] = {}
        # Targets by (row, output size): stages that share an output size encode each target once.
        self._targets: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}

    def prompt(self, row: Row, plan: Plan) -> PromptEmbeds:
        """The instruction encoded with the references' VL copies, on the CPU.

        The VL sizes in ``plan`` depend on ``vl_budget`` only, not on the stage, so one encoding
        serves every stage.
        """
        key = (row.instruction, tuple(str(p) for p in row.references))
        if key in self._prompts:
            return self._prompts[key]
        images = [load_image(p, name=f"reference {k}") for k, p in enumerate(row.references, 1)]
        vl = [im.resize(r.vl, resample=Image.Resampling.LANCZOS) for im, r in zip(images, plan.references)]
        te = self.c.text_encoder
        emb = encode_prompt(te, self.c.processor, row.instruction, vl, device=te.device).to("cpu")
        if self.cfg.cache_text_embeddings:
            self._prompts[key] = emb
        return emb

    @torch.no_grad()
    def latents(self, index: int, row: Row, stage_index: int, stage: Stage) -> Encoded:
        key = (stage_index, index)
        if key in self._latents:
            return self._latents[key]
        plan = plan_row(row, stage, self.cfg)
        vae = self.c.vae
        images = [load_image(p, name=f"reference {k}") for k, p in enumerate(row.references, 1)]
        refs = [pack_latents(vae_encode(vae, to_pixels(im, *r.vae))).cpu() for im, r in zip(images, plan.references)]
        x0 = self._targets.get((index, plan.output))
        if x0 is None:
            x0 = pack_latents(vae_encode(vae, to_pixels(load_image(row.target, name="target"), *plan.output))).cpu()
        enc = Encoded(x0, refs, plan.img_shapes, plan)
        if self.cfg.cache_latents:
            if self._latents and next(iter(self._latents))[0] != stage_index:
                self._latents.clear()  # a new stage: the old reference sizes are not used again
                self._targets = {k: v for k, v in self._targets.items() if k[1] == plan.output}
            self._latents[key] = enc
            self._targets[(index, plan.output)] = x0
        return enc


@dataclass
class Batch:
    """Model inputs for one micro-batch; every sample has the layout ``img_shapes``."""

    x0: torch.Tensor  # [b, L, 64]
    refs: list[torch.Tensor]  # [b, L_k, 64] per reference
    embeds: torch.Tensor  # [b, T, D], padded at the end to the longest prompt
    mask: torch.Tensor | None  # [b, T] 1 valid / 0 padding; None when no sample is padded
    img_shapes: list[list[tuple[int, int, int]]]  # one (identical) layout per sample


def collate(items: list[Encoded], prompts: list[PromptEmbeds], device, dtype) -> Batch:
    """Stack samples of ONE layout; pad prompt embeddings to the longest with a mask.

    Padding goes at the END of the text: the transformer gives text token j the RoPE position
    (largest image index + j), so trailing pads leave every real token where its one-sample forward
    puts it, and ``encoder_hidden_states_mask`` (0 on pads) keeps every query from attending to a pad.
    The pads' own text states are computed but never read. Layouts cannot be padded this way (RoPE is
    built from the first sample's ``img_shapes``), hence the buckets.
    """
    layout = items[0].img_shapes
    if any(it.img_shapes != layout for it in items):
        raise ValueError(f"a batch mixes layouts {[it.img_shapes for it in items]}: bucket samples by layout_key")
    b = len(items)
    x0 = torch.cat([it.x0 for it in items]).to(device, dtype)
    refs = [torch.cat([it.refs[k] for it in items]).to(device, dtype) for k in range(len(items[0].refs))]
    lengths = [p.embeds.shape[1] for p in prompts]
    longest = max(lengths)
    dim = prompts[0].embeds.shape[2]
    embeds = torch.zeros(b, longest, dim, dtype=dtype, device=device)
    mask = torch.zeros(b, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        embeds[i, : lengths[i]] = p.embeds[0].to(device, dtype)
        mask[i, : lengths[i]] = 1
    if min(lengths) == longest:
        mask = None  # nothing padded: the one-prompt call of inference passes no mask either
    return Batch(x0, refs, embeds, mask, [layout] * b)


# --------------------------------------------------------------------------------------------------
# 3. Sampling batches
# --------------------------------------------------------------------------------------------------


class BucketSampler:
    """Global batches of micro-batches, each micro-batch of ONE layout; deterministic from
    (seed, stage, epoch, step).

    An epoch shuffles every bucket (samples of one layout) and cuts it into micro-batches of
    ``micro_batch_size`` (a bucket's last micro-batch, or a bucket smaller than one, is filled by
    wrapping around its own shuffled samples), then shuffles all micro-batches together. Each bucket
    thus gives ceil(n / micro_batch_size) micro-batches per epoch: buckets are drawn in proportion to
    their size. The epochs are laid end to end and global batch s is micro-batches
    [s·m, (s+1)·m) of that stream, m = ``batch_size / micro_batch_size``. A resumed run needs only
    (stage, step) to continue exactly where it stopped, and the batch does not depend on how many
    processes share it.
    """

    def __init__(self, keys: list, batch_size: int, micro_batch_size: int, seed: int, stage_index: int):
        if not keys:
            raise UniRefError("no usable training rows: see the data report above for why rows were skipped")
        groups = defaultdict(list)
        for i, key in enumerate(keys):
            groups[key].append(i)
        self.keys = sorted(groups)
        self.buckets = [groups[k] for k in self.keys]
        self.micro = micro_batch_size
        self.per_batch = batch_size // micro_batch_size
        self.seed = seed
        self.stage_index = stage_index
        self.micro_per_epoch = sum(math.ceil(len(b) / micro_batch_size) for b in self.buckets)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """The shuffled micro-batches of one epoch."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        rng = np.random.default_rng([self.seed, self.stage_index, epoch])
        micros = []
        for bucket in self.buckets:
            order = [bucket[i] for i in rng.permutation(len(bucket))]
            n = math.ceil(len(order) / self.micro)
            wrapped = [order[i % len(order)] for i in range(n * self.micro)]
            micros += [wrapped[j * self.micro : (j + 1) * self.micro] for j in range(n)]
        micros = [micros[i] for i in rng.permutation(len(micros))]
        self._epoch = (epoch, micros)
        return micros

    def batch(self, step: int) -> list[list[int]]:
        """The global batch of stage step ``step`` (0-based): its micro-batches of dataset indices."""
        out = []
        for j in range(step * self.per_batch, (step + 1) * self.per_batch):
            epoch, pos = divmod(j, self.micro_per_epoch)
            out.append(self.epoch(epoch)[pos])
        return out


def shard(batch: list[list[int]], rank: int, world: int) -> list[list[tuple[int, int]]]:
    """This process's micro-batches of a global batch, as (slot in the global batch, dataset index).

    Contiguous shards: process r takes micro-batches [r·n, (r+1)·n). The slot, not the process,
    seeds a sample's noise and σ, so the global batch is the same computation for any process count.
    """
    size = len(batch[0])
    slotted = [[(m * size + j, idx) for j, idx in enumerate(micro)] for m, micro in enumerate(batch)]
    per = len(batch) // world
    return slotted[rank * per : (rank + 1) * per]
