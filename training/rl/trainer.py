"""MSGRPO: Flow-GRPO-style RL on SELF multi-reference edits, with one reward signal per reference.

    python -m training.msgrpo --config training/configs/msgrpo_default.json [--resume auto|PATH]
    accelerate launch --num_processes 2 -m training.msgrpo --config …   # or torchrun; CPU: gloo

One step, top to bottom:
1. ``groups_per_step`` prompts (manifest rows) drawn for the step; each process takes whole groups;
2. rollouts: for each prompt G images from the engine's own denoising loop (`UniRefPipeline.denoise`, the one
   the sampler uses), SDE steps inside ``sde_window`` (log-probabilities kept), ODE steps outside it;
3. rewards: every source scores the G images (one signal per reference, instruction, quality, …); images a
   source could not score are dropped from their group and counted;
4. advantages per group from the signals (`training.rl.advantages`: sum, normalized_sum, min, product);
5. the clipped-ratio loss on every kept image and SDE step, re-scored with the live weights through the same
   velocity call (`UniRefPipeline.velocity`: no second copy of the CFG maths), optional KL to the start model;
   gradients summed over processes and divided by the global count, so any process count trains alike;
6. logs (every signal's mean and spread, a reward plot, rollout grids) and atomic checkpoints that resume exactly.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from uniref_core.errors import UniRefError
from uniref_core.images import load_image
from uniref_core.model import check_model_folder, read_defaults
from uniref_core.pipeline import SamplingOptions, SelfConditioning, UniRefPipeline
from uniref_core.prompt import PromptEmbeds
from uniref_core.sampling import DenoiseStep, sde_step

from ..common import checkpoint as ckpt_mod
from ..common.cache import ShardCache, rows_digest
from ..common.cli import exit_on_error, trainer_main
from ..common.data import Row, encode_row, load_rows, plan_row
from ..common.logging_utils import make_grid, plot_series
from ..common.model import free, heap_kept, load_encoders, load_transformer, use_checkpointing
from ..common.run import TrainingRun
from ..common.schedules import lr_multiplier
from ..common.seeds import sample_seed
from ..common.trainable import (
    adapters_disabled,
    load_trainable_state_dict,
    named_trainable,
    setup_transformer,
    trainable_state_dict,
)
from ..memory import check_fit
from ..rewards import RewardBatch, check_batch, load_source, merge
from .advantages import group_advantages
from .config import RLConfig, check_world, load_config
from .loss import clipped_policy_loss, kl_to_reference

REWARD_PLOT = "rewards.png"
REWARD_SMOOTH = 10  # steps in the plotted trailing mean


@dataclass
class Rollout:
    """One group: G images of one prompt, the steps that made them, their rewards and advantages."""

    group: int  # index of the group within its step
    row: Row
    cond: SelfConditioning
    steps: list[DenoiseStep]  # the SDE ones (those with a log-probability)
    images: list
    rewards: RewardBatch | None = None
    advantages: np.ndarray | None = None  # [G], NaN for dropped images
    reward: np.ndarray | None = None  # [G] the aggregated reward (NaN for dropped images)

    @property
    def keep(self) -> np.ndarray:
        return np.isfinite(self.advantages)

    @property
    def informative(self) -> bool:
        """Some kept image has a non-zero advantage. A group whose images all scored alike teaches nothing:
        it is not re-scored, and a step with no such group takes no optimizer step (Adam's momentum would
        otherwise keep moving the weights on a zero gradient)."""
        return bool(self.keep.any() and np.abs(self.advantages[self.keep]).max() > 0)


@dataclass
class RLResult:
    output_dir: Path
    global_step: int
    is_main: bool = True
    records: list[dict] = field(default_factory=list)  # one per step run in this call
    checkpoint: Path | None = None


def prompts_for_step(seed: int, step: int, n_rows: int, groups: int) -> list[int]:
    """The rows of one step's groups: a function of (seed, step) only, so resume and process count agree."""
    rng = np.random.default_rng([seed, step, 17])
    return [int(i) for i in rng.choice(n_rows, size=groups, replace=n_rows < groups)]


class PromptCache:
    """Every prompt's conditioning (text states, reference latents), encoded once before the transformer loads
    (`common.cache`); the plan, which needs no network, is recomputed when a row is read."""

    def __init__(self, root, cfg: RLConfig, rows: list[Row], encoders_fingerprint: str):
        self.cfg, self.rows = cfg, rows
        key = {
            "encoders": encoders_fingerprint,
            "rows": rows_digest(rows),
            "cfg": cfg.cfg,
            "budget": cfg.budget,
            "output_size": cfg.output_size,
            "vl_budget": cfg.vl_budget,
            "upscale": cfg.upscale,
        }
        self.cache = ShardCache(root, "rl-prompts", key)

    def build(self, encoders, rank=0, world=1, barrier=lambda: None, progress=None) -> None:
        pipe = UniRefPipeline(encoders)

        def encode(i):
            cond = encode_row(pipe, self.rows[i], self.cfg.stages[0], self.cfg, self.cfg.cfg)
            tensors = {f"ref{k}": r for k, r in enumerate(cond.ref_tokens)}
            meta = {}
            for name, p in (("positive", cond.positive), ("negative", cond.negative)):
                if p is not None:
                    tensors[name] = p.embeds
                    if p.mask is not None:
                        tensors[f"{name}_mask"] = p.mask
                    meta[name] = p.vl_tokens
            return tensors, meta

        self.cache.build(len(self.rows), encode, rank, world, barrier, progress)

    def cond(self, i: int) -> SelfConditioning:
        t, meta = self.cache.get(i)

        def prompt(name):
            return PromptEmbeds(t[name], t.get(f"{name}_mask"), meta[name]) if name in meta else None

        refs = [t[f"ref{k}"] for k in range(self.rows[i].k)]
        return SelfConditioning(
            plan_row(self.rows[i], self.cfg.stages[0], self.cfg), prompt("positive"), prompt("negative"), refs
        )


def rollout(pipe: UniRefPipeline, cfg: RLConfig, row: Row, cond: SelfConditioning, group: int, seed: int) -> Rollout:
    """G images of ``row`` by the engine's denoising loop; the SDE steps are kept for the update."""
    cond = cond.to(pipe.device, pipe.dtype)
    opts = SamplingOptions(
        seed=seed,
        steps=cfg.rollout_steps,
        cfg=cfg.cfg,
        sampler="sde",
        eta=cfg.eta,
        num_images=cfg.group_size,
        sde_window=tuple(cfg.sde_window) if cfg.sde_window else None,
    )
    kept, last = [], None
    for s in pipe.denoise(cond, opts):
        if s.log_prob is not None:
            kept.append(s)
        last = s
    x = last.x_next
    # Decoded in chunks: the VAE's activations grow with the batch (~4 GiB per image at 1024² in bf16).
    images = [
        im
        for i in range(0, len(x), cfg.decode_batch)
        for im in pipe.decode(x[i : i + cfg.decode_batch], cond.width, cond.height)
    ]
    return Rollout(group, row, cond, kept, images)


def score_rollout(r: Rollout, sources, cfg: RLConfig) -> None:
    """Every source on the group's images, checked; then the group's advantages (clipped)."""
    g = len(r.images)
    batches = [check_batch(src(r.images, r.row), spec.source, g) for spec, src in sources]
    r.rewards = merge(batches, g)
    weights = {}
    for spec in cfg.rewards:
        for key in r.rewards.signals:
            if key.startswith(spec.source + "/"):
                weights[key] = spec.weight * spec.signal_weights.get(key[len(spec.source) + 1 :], 1.0)
    adv, reward = group_advantages(r.rewards, weights, cfg.aggregation)
    r.advantages = np.where(np.isfinite(adv), np.clip(adv, -cfg.adv_clip_max, cfg.adv_clip_max), np.nan)
    r.reward = reward


def policy_loss(
    pipe: UniRefPipeline, r: Rollout, step: DenoiseStep, cfg: RLConfig, keep: torch.Tensor, ref_velocity=None
):
    """(mean loss over the images ``keep`` selects at one SDE step, stats): new log-probs from the live weights."""
    x, x_next = step.x[keep], step.x_next[keep]
    v = pipe.velocity(x, step.timestep, r.cond, cfg.cfg)
    _, log_prob, mean, scale = sde_step(x, v, step.sigma, step.sigma_next, eta=cfg.eta, prev_sample=x_next)
    adv = torch.from_numpy(r.advantages[keep.numpy()]).to(log_prob.device, torch.float32)
    loss, stats = clipped_policy_loss(log_prob, step.log_prob[keep].to(log_prob.device), adv, cfg.clip_range)
    if cfg.beta > 0:
        with torch.no_grad():
            v_ref = ref_velocity(x, step.timestep, r.cond)
            _, _, ref_mean, _ = sde_step(x, v_ref, step.sigma, step.sigma_next, eta=cfg.eta, prev_sample=x_next)
        kl = kl_to_reference(mean, ref_mean, scale).mean()
        loss = loss + cfg.beta * kl
        stats["kl"] = float(kl)
    return loss, stats


def micro_batches(keep: np.ndarray, size: int | None) -> list[torch.Tensor]:
    """The kept images of a group as boolean masks of at most ``size`` images each (None: one mask)."""
    kept = np.flatnonzero(keep)
    size = size or max(len(kept), 1)
    masks = []
    for i in range(0, len(kept), size):
        m = np.zeros(len(keep), dtype=bool)
        m[kept[i : i + size]] = True
        masks.append(torch.from_numpy(m))
    return masks


def _all_reduce_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _signal_stats(rollouts: list[Rollout]) -> dict:
    """Per signal: (sum, sum of squares, count) over the kept images of this process's groups."""
    acc: dict[str, list[float]] = {}
    for r in rollouts:
        keep = r.keep
        items = [(k, s.values) for k, s in r.rewards.signals.items()] + [("total", r.reward)]
        for key, values in items:
            v = np.asarray(values, float)[keep]
            a = acc.setdefault(key, [0.0, 0.0, 0])
            a[0] += float(v.sum())
            a[1] += float((v**2).sum())
            a[2] += int(v.size)
    return acc


def _merge_stats(parts: list[dict]) -> dict:
    out = {}
    for part in parts:
        for key, (s, sq, n) in part.items():
            a = out.setdefault(key, [0.0, 0.0, 0])
            a[0], a[1], a[2] = a[0] + s, a[1] + sq, a[2] + n
    stats = {}
    for key, (s, sq, n) in sorted(out.items()):
        if n:
            mean = s / n
            stats[f"reward/{key}"] = mean
            stats[f"reward_std/{key}"] = math.sqrt(max(sq / n - mean * mean, 0.0))
    return stats


def _reference_velocity(cfg: RLConfig, transformer, pipe: UniRefPipeline):
    """The frozen start model's velocity, for the KL term: LoRA off (no copy), or a frozen copy of the full weights."""
    if cfg.beta <= 0:
        return None
    if cfg.lora is not None:

        def velocity(x, timestep, cond):
            with adapters_disabled(transformer):
                return pipe.velocity(x, timestep, cond, cfg.cfg)

        return velocity
    frozen = UniRefPipeline(replace(pipe.c, transformer=copy.deepcopy(transformer).requires_grad_(False).eval()))
    return lambda x, timestep, cond: frozen.velocity(x, timestep, cond, cfg.cfg)


def run(cfg: RLConfig, resume: str | None = None, trusted_modules=()) -> RLResult:
    """Train as ``cfg`` says; ``resume``: None (fresh), "auto" (newest checkpoint if any) or a path."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes

    # 1. Config, reward sources and resume checks, before any model work ---------------------------
    check_world(cfg, world)
    if accelerator.device.type == "cuda":  # a run that cannot fit stops here, before any weight loads
        check_fit(cfg, "msgrpo", world, torch.cuda.get_device_properties(accelerator.device).total_memory)
    check_model_folder(cfg.model)
    defaults = read_defaults(cfg.model)
    if cfg.budget is None or cfg.vl_budget is None:  # as at inference: the model's defaults
        from uniref_core.pipeline import BUILTIN_DEFAULTS

        cfg = replace(
            cfg,
            budget=cfg.budget or int(defaults.get("budget", BUILTIN_DEFAULTS["budget"])),
            vl_budget=cfg.vl_budget or defaults.get("vl_budget"),
        )
    sources = [(spec, load_source(spec.source, spec.options, trusted_modules)) for spec in cfg.rewards]
    tr = TrainingRun(cfg, accelerator, resume, kind="msgrpo")
    out, log, global_step = tr.out, tr.log, tr.global_step

    # 2. The prompts, each encoded once (common.cache); then the text encoder leaves, the VAE stays to decode --
    rows, report = load_rows(cfg.train_manifest, cfg, "train")
    if main:
        print(report.summary())
    if not rows:
        raise UniRefError(
            f"no usable rows in {', '.join(cfg.train_manifest)} (see the report above): fix the manifest"
        )
    device = accelerator.device
    prompts = PromptCache(
        Path(cfg.cache_dir or out / "cache"), cfg, rows, ckpt_mod.model_fingerprint(cfg.model, ("text_encoder", "vae"))
    )
    encoders = load_encoders(cfg, device)
    if not prompts.cache.ready:
        with heap_kept(device), tqdm(total=len(rows), disable=not main, desc="encoding", dynamic_ncols=True) as ebar:
            prompts.build(encoders, rank, world, accelerator.wait_for_everyone, ebar.update)
    encoders = replace(encoders, text_encoder=None)
    free(device)

    # 3. The model: trainable weights, the pipeline around them, the frozen start for the KL ----------
    set_seed(cfg.seed)
    transformer = load_transformer(cfg, device)
    setup_transformer(transformer, cfg.lora, use_checkpointing(cfg))
    transformer.eval()  # no dropout: rollouts and re-scoring must see the same function
    if tr.resumed:
        load_trainable_state_dict(transformer, tr.tensors(ckpt_mod.TRAINABLE_FILE))
    params = named_trainable(transformer)
    pipe = UniRefPipeline(replace(encoders, transformer=transformer))
    ref_velocity = _reference_velocity(cfg, transformer, pipe)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.steps, cfg.warmup, "constant"))
    if tr.resumed:
        tr.restore_optimizer(optimizer, scheduler)
        tr.continue_after_checkpoint()

    # 4. The steps ---------------------------------------------------------------------------------------
    result = RLResult(out, global_step, main)
    bar = tqdm(total=cfg.steps, initial=global_step, disable=not main, desc="msgrpo", dynamic_ncols=True)
    while global_step < cfg.steps:
        t0 = time.perf_counter()
        picks = prompts_for_step(cfg.seed, global_step, len(rows), cfg.groups_per_step)
        mine = [(g, i) for g, i in enumerate(picks) if g % world == rank]
        with torch.no_grad(), accelerator.autocast():
            rollouts = [
                rollout(pipe, cfg, rows[i], prompts.cond(i), g, sample_seed(cfg.seed, global_step, g)) for g, i in mine
            ]
        t_roll = time.perf_counter() - t0
        for r in rollouts:
            score_rollout(r, sources, cfg)
        local = sum(int(r.keep.sum()) * len(r.steps) for r in rollouts if r.informative)
        count = int(_all_reduce_sum(torch.tensor([float(local)]), world)[0])
        stats: dict[str, list[float]] = {}
        for _ in range(cfg.inner_epochs):
            optimizer.zero_grad(set_to_none=False)
            for r in rollouts:
                if not r.informative:
                    continue
                for s in r.steps:
                    for keep in micro_batches(r.keep, cfg.policy_micro_batch):
                        with accelerator.autocast():
                            loss, st = policy_loss(pipe, r, s, cfg, keep, ref_velocity)
                        # Each item weighs 1/count: summed over processes this is the global mean.
                        (loss * (int(keep.sum()) / max(count, 1))).backward()
                        for k, v in {"loss": float(loss.detach()), **st}.items():
                            stats.setdefault(k, []).append(v)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
            flat = _all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), world)
            offset = 0
            for p, g in zip(params.values(), grads):
                p.grad = flat[offset : offset + g.numel()].view_as(g).to(p.dtype)
                offset += g.numel()
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm))
            if count > 0:
                optimizer.step()
        with warnings.catch_warnings():
            # The schedule follows the step count, stepped or not; PyTorch warns when the first steps had
            # no signal (no optimizer step), which is expected here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            scheduler.step()
        global_step += 1

        notes = [n for r in rollouts for n in r.rewards.notes]
        parts = _gather(
            (
                _signal_stats(rollouts),
                {k: (sum(v), len(v)) for k, v in stats.items()},
                sum(int((~r.keep).sum()) for r in rollouts),
                notes[:5],
                sum(not r.informative for r in rollouts),
            ),
            world,
        )
        record = {
            "kind": "train",
            "step": global_step,
            "lr": scheduler.get_last_lr()[0],
            **_merge_stats([p[0] for p in parts]),
        }
        for key in {k for p in parts for k in p[1]}:
            total, n = sum(p[1].get(key, (0, 0))[0] for p in parts), sum(p[1].get(key, (0, 0))[1] for p in parts)
            record[key] = total / n if n else None
        record.update(
            {
                "dropped": sum(p[2] for p in parts),
                "drop_notes": [n for p in parts for n in p[3]],
                "groups_without_signal": sum(p[4] for p in parts),
                "items": count,
                "processes": world,
                "grad_norm": grad_norm,
                "rollout_seconds": t_roll,
                "seconds": time.perf_counter() - t0,
            }
        )
        if record.get("loss") is not None and not math.isfinite(record["loss"]):
            raise UniRefError(
                f"loss is {record['loss']} at step {global_step}: lower lr or keep max_grad_norm; "
                "the last checkpoint is intact"
            )
        result.records.append(record)
        if main and (global_step % cfg.log_every == 0 or global_step == cfg.steps):
            log.write(record)
        if main and cfg.grid_every and (global_step % cfg.grid_every == 0 or global_step == 1) and rollouts:
            _save_grid(rollouts[0], out, global_step, log)
        bar.update(1)
        bar.set_postfix(reward=f"{record.get('reward/total', float('nan')):.3f}")
        end = global_step == cfg.steps
        if end or (cfg.save_every and global_step % cfg.save_every == 0):
            result.checkpoint = tr.save(
                global_step,
                trainable=trainable_state_dict(transformer),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                stage_end=end,
            )
    bar.close()
    result.global_step = global_step
    if main:
        plot_series(
            log.records(),
            out / REWARD_PLOT,
            prefix="reward/",
            ylabel="reward (mean over kept images)",
            smooth=REWARD_SMOOTH,
        )
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _save_grid(r: Rollout, out: Path, step: int, log) -> None:
    refs = [load_image(p) for p in r.row.references]
    target = load_image(r.row.target)
    rows = [(refs, target, im) for im in r.images]
    captions = [
        f"step {step} image {i}: reward {r.reward[i]:.2f} adv {r.advantages[i]:+.2f}"
        if r.keep[i]
        else f"step {step} image {i}: dropped"
        for i in range(len(r.images))
    ]
    folder = out / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    grid = make_grid(rows, captions=captions)
    grid.save(folder / f"step_{step:08d}.png")
    log.image("rollouts/grid", grid, step)


@exit_on_error
def main(argv=None) -> int:
    return trainer_main(
        argv,
        prog="python -m training.msgrpo",
        description=__doc__.split("\n")[0],
        config_help="JSON or TOML config (see training/rl/config.py)",
        load_config=load_config,
        run=run,
        reward_modules=True,
    )
