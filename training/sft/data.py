"""SFT data: rows (`common.data.load_rows`) encoded with the inference code, batched by layout.

1. ``SampleEncoder``: a sample becomes model inputs through the SAME functions ``UniRefPipeline.encode``
   calls (``plan_references`` in mode "budget", then `uniref_core.encoding`: ``encode_prompt`` on the VL copies
   within the same room, ``encode_references``), so training and inference cannot drift apart;
   ``SampleCache`` runs it once over every row before training (`common.cache`) and reads the result back per batch.
2. ``BucketSampler`` + ``collate``: every batch shares one layout (see ``common.data.layout_key``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from uniref_core.budget import Plan
from uniref_core.encoding import encode_image, encode_references, prompt_room, vl_copies
from uniref_core.errors import UniRefError
from uniref_core.images import load_image
from uniref_core.prompt import PromptEmbeds, encode_prompt

from ..common.cache import ShardCache, rows_digest
from ..common.config import Stage
from ..common.data import Row, model_token_px, plan_row
from .config import SFTConfig

# --------------------------------------------------------------------------------------------------
# 1. Encoding
# --------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A sample's latents at one stage, on the CPU: packed target and reference tokens and the layout."""

    x0: torch.Tensor  # [1, L, 64]
    refs: list[torch.Tensor]  # [1, L_k, 64] each
    img_shapes: list[tuple[int, int, int]]
    plan: Plan | None = None  # None when read back from the cache


class SampleEncoder:
    """Encodes rows exactly as ``UniRefPipeline.encode`` does (needs the text encoder and the VAE)."""

    def __init__(self, components, cfg: SFTConfig):
        self.c = components
        self.cfg = cfg

    @torch.no_grad()
    def prompt(self, row: Row, plan: Plan) -> PromptEmbeds:
        """The instruction encoded with the references' VL copies, on the CPU. The VL sizes in ``plan`` depend on
        ``vl_budget`` only, not on the stage, so one encoding serves every stage."""
        te = self.c.text_encoder
        return encode_prompt(
            te,
            self.c.processor,
            row.instruction,
            vl_copies(_references(row), plan),
            device=te.device,
            max_tokens=prompt_room(te, plan),
            name=f"{row.where}: instruction",
        ).to("cpu")

    @torch.no_grad()
    def latents(self, row: Row, stage: Stage) -> Encoded:
        plan = plan_row(row, stage, self.cfg)
        refs = [t.cpu() for t in encode_references(self.c.vae, _references(row), plan)]
        x0 = encode_image(self.c.vae, load_image(row.target, name="target"), *plan.output).cpu()
        return Encoded(x0, refs, plan.img_shapes, plan)


def _references(row: Row) -> list[Image.Image]:
    return [load_image(p, name=f"reference {k}") for k, p in enumerate(row.references, 1)]


class SampleCache:
    """Every row's prompt and, per stage, latents: encoded once into `common.cache` shards, read per batch."""

    def __init__(self, root, cfg: SFTConfig, rows: list[Row], encoders_fingerprint: str):
        key = {
            "encoders": encoders_fingerprint,
            "rows": rows_digest(rows),
            "vl_budget": cfg.vl_budget,
            "upscale": cfg.upscale,
            "token_px": model_token_px(str(cfg.model)),
        }
        self.cfg, self.rows = cfg, rows
        self.prompts = ShardCache(root, "prompts", key)
        self.stages = [
            ShardCache(
                root,
                f"stage{i + 1}",
                {
                    **key,
                    "budget": st.budget,
                    "output_size": st.output_size,
                    "allow_target_upscale": cfg.allow_target_upscale,
                },
            )
            for i, st in enumerate(cfg.stages)
        ]

    @property
    def ready(self) -> bool:
        return self.prompts.ready and all(c.ready for c in self.stages)

    def build(self, encoder: SampleEncoder, rank: int = 0, world: int = 1, barrier=lambda: None, progress=None):
        """Encode what is not on disk yet (the encoders must be loaded)."""
        rows, cfg = self.rows, self.cfg

        def prompt(i):
            p = encoder.prompt(rows[i], plan_row(rows[i], cfg.stages[0], cfg))
            tensors = {"embeds": p.embeds} if p.mask is None else {"embeds": p.embeds, "mask": p.mask}
            return tensors, {"vl_tokens": p.vl_tokens}

        self.prompts.build(len(rows), prompt, rank, world, barrier, progress)
        for stage, cache in zip(cfg.stages, self.stages):

            def latents(i, stage=stage):
                e = encoder.latents(rows[i], stage)
                return {"x0": e.x0, **{f"ref{k}": r for k, r in enumerate(e.refs)}}, {"img_shapes": e.img_shapes}

            cache.build(len(rows), latents, rank, world, barrier, progress)

    def sample(self, index: int, stage_index: int) -> tuple[Encoded, PromptEmbeds]:
        t, meta = self.stages[stage_index].get(index)
        refs = [t[f"ref{k}"] for k in range(self.rows[index].k)]
        encoded = Encoded(t["x0"], refs, [tuple(s) for s in meta["img_shapes"]])
        p, pmeta = self.prompts.get(index)
        return encoded, PromptEmbeds(p["embeds"], p.get("mask"), pmeta["vl_tokens"])


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
# 2. Sampling batches
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
