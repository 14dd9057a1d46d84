"""Supervised fine-tuning of a Qwen-Image-Edit-family transformer on SELF multi-reference edits.

    python -m training.sft --config training/configs/tiny_shapecompose.json [--resume auto|PATH]
    accelerate launch --multi_gpu --num_processes 2 -m training.sft --config …   # DDP (CPU: gloo)
    torchrun --nproc_per_node 8 -m training.sft --config …    # with "fsdp": true: a full fine-tune sharded (FSDP2)

The run, top to bottom:
1. config and resume checks (a checkpoint of another model or config is refused before any loading);
2. the data: manifest rows checked and reported;
3. the encoding pass: the text encoder and VAE encode every row once, like inference, into a disk cache
   (`common.cache`, reused by resume and later runs), then leave the device;
4. the transformer, loaded straight into its dtype (``base_dtype``), made trainable: LoRA or every weight; under
   ``fsdp`` built on the meta device and sharded before each process fills its own rows (`common.fsdp`);
5. the stages in order (progressive budgets), each with its own AdamW and LR schedule; per step the
   global batch is sharded over processes, the flow-matching loss is taken on the target tokens,
   gradients are clipped, EMA updated, the step logged; checkpoints and evaluations at their
   intervals and at every stage's end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uniref_core.errors import UniRefError
from uniref_core.pipeline import UniRefPipeline

from ..common import checkpoint as ckpt_mod
from ..common.cli import exit_on_error, trainer_main
from ..common.config import Stage
from ..common.data import encode_row, layout_key, load_rows, plan_row
from ..common.fsdp import clip_grad_norm, local_fraction, process_group, sharded_transformer
from ..common.logging_utils import PLOT_FILE, plot_loss
from ..common.model import free, heap_kept, load_encoders, load_transformer, use_checkpointing
from ..common.run import TrainingRun
from ..common.schedules import lr_multiplier
from ..common.trainable import EMA, load_trainable_state_dict, named_trainable, setup_transformer, trainable_state_dict
from ..evaluate import evaluate
from ..memory import check_fit
from .config import SFTConfig, check_world, load_config, micro_batch_size
from .data import BucketSampler, SampleCache, SampleEncoder, collate, shard
from .loss import draw_noise_and_sigma, flow_matching_loss


@dataclass
class RunResult:
    output_dir: Path
    global_step: int
    is_main: bool = True
    losses: list[float] = field(default_factory=list)  # one per step run in this call
    checkpoint: Path | None = None  # the last one written


def stage_lr_multiplier(stage: Stage, cfg: SFTConfig):
    """The stage's schedule: its own warmup and schedule where it sets them, else the config's."""
    warmup = cfg.warmup if stage.warmup is None else stage.warmup
    return lr_multiplier(stage.steps, warmup, stage.schedule or cfg.schedule)


def _position(state: dict, cfg: SFTConfig) -> tuple[int, int, int]:
    """(stage index, steps done in it, global step) to continue from; a finished stage moves on."""
    stage, done = state["stage"], state["stage_step"]
    if done >= cfg.stages[stage].steps:
        stage, done = stage + 1, 0
    return stage, done, state["global_step"]


def _make_accelerator(cfg: SFTConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # The last block's text-stream layers (to_add_out, txt_mlp) feed nothing the loss sees: their
    # gradients never arrive, which DDP must be told about.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # cpu=True where there is no GPU: accelerate then runs DDP over gloo under torchrun / accelerate launch.
    # No gradient_accumulation_steps: the number of micro-batches per process varies by stage and process
    # count, so the loop accumulates itself with accelerator.no_sync (what accumulate() does inside).
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def run(cfg: SFTConfig, resume: str | None = None) -> RunResult:
    """Train as ``cfg`` says; ``resume``: None (fresh), "auto" (newest checkpoint if any) or a path."""
    if cfg.vl_budget is None:  # as at inference: the model folder's default (uniref.json), else 384² each
        from dataclasses import replace

        from uniref_core.model import read_defaults

        cfg = replace(cfg, vl_budget=read_defaults(cfg.model).get("vl_budget"))
    accelerator = _make_accelerator(cfg)
    with process_group(accelerator.device) if cfg.fsdp else contextlib.nullcontext():
        return _train(cfg, accelerator, resume)


def _train(cfg: SFTConfig, accelerator, resume: str | None) -> RunResult:
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes

    # 1. Config and resume checks ----------------------------------------------------------------
    check_world(cfg, world)
    if accelerator.device.type == "cuda":  # a run that cannot fit stops here, before any weight loads
        check_fit(cfg, "sft", world, torch.cuda.get_device_properties(accelerator.device).total_memory)
    fsdp = cfg.fsdp
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UniRefError(
            "this run was launched with an accelerate FSDP config: the trainer shards with FSDP2 itself "
            'when the SFT config says "fsdp": true; launch with torchrun --nproc_per_node N (or '
            "accelerate launch --multi_gpu) instead"
        )
    if fsdp and main and cfg.eval_samples:
        print("FSDP: in-training evaluation is skipped (the sampler runs one process); evaluate exported checkpoints")
    tr = TrainingRun(cfg, accelerator, resume, kind="sft")
    out, log = tr.out, tr.log
    stage0, step0, global_step = _position(tr.state, cfg) if tr.resumed else (0, 0, 0)

    # 2. The data ----------------------------------------------------------------------------------
    rows, report = load_rows(cfg.train_manifest, cfg, "train")
    val_rows, val_report = load_rows(cfg.val_manifest, cfg, "val") if cfg.val_manifest else (rows, None)
    if main:
        print(report.summary())
        if val_report:
            print(val_report.summary())
        reports = [report.to_dict()] + ([val_report.to_dict()] if val_report else [])
        (out / "data_report.json").write_text(json.dumps(reports, indent=1))
    if not rows:
        raise UniRefError("no usable training rows: see the data report above for why rows were skipped")

    # 3. The encoding pass: every row once through the text encoder and VAE (common.cache), which then leave --
    device = accelerator.device
    cache = SampleCache(
        Path(cfg.cache_dir or out / "cache"), cfg, rows, ckpt_mod.model_fingerprint(cfg.model, ("text_encoder", "vae"))
    )
    evaluating = bool(cfg.eval_samples) and not fsdp and bool(val_rows)
    encoders = None
    if not cache.ready or evaluating:
        encoders = load_encoders(cfg, device)
    if not cache.ready:
        todo = len(rows) * (1 + len(cfg.stages))
        with heap_kept(device), tqdm(total=todo, disable=not main, desc="encoding", dynamic_ncols=True) as ebar:
            cache.build(SampleEncoder(encoders, cfg), rank, world, accelerator.wait_for_everyone, ebar.update)
    eval_conds = encode_eval_rows(encoders, cfg, val_rows) if evaluating and main else None
    c = dataclasses.replace(encoders, text_encoder=None) if evaluating else None  # the VAE stays to decode
    encoders = None
    free(device)

    # 4. The transformer, straight into its dtype, made trainable ---------------------------------------
    set_seed(cfg.seed)  # LoRA's initialisation: identical on every process and for any process count
    if fsdp:
        shards = tr.checkpoint / ckpt_mod.TRAINABLE_SHARDS if tr.resumed else None
        transformer = sharded_transformer(cfg, device, shards)
        # Only accelerate's autocast (evaluation_mode: no DDP wrapper): FSDP2 reduces the gradients itself.
        model = accelerator.prepare_model(transformer, device_placement=False, evaluation_mode=True)
        held, whole = local_fraction(transformer)
        print(f"FSDP: process {rank} of {world} holds {held:,} of the {whole:,} weights ({held / whole:.1%})")
    else:
        transformer = load_transformer(cfg, device)
        setup_transformer(transformer, cfg.lora, use_checkpointing(cfg))
        if tr.resumed:
            load_trainable_state_dict(transformer, tr.tensors(ckpt_mod.TRAINABLE_FILE))
        model = accelerator.prepare(transformer)
    params = named_trainable(transformer)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None and tr.resumed:
        ema.load_state_dict(tr.tensors(ckpt_mod.EMA_FILE))

    if tr.resumed:
        tr.continue_after_checkpoint()
        if main:
            print(f"resumed from {tr.checkpoint} at step {global_step} (stage {stage0 + 1}, step {step0})")

    # 5. The stages --------------------------------------------------------------------------------
    result = RunResult(out, global_step, main)
    bar = tqdm(total=cfg.total_steps, initial=global_step, disable=not main, desc="sft", dynamic_ncols=True)
    for si in range(stage0, len(cfg.stages)):
        stage = cfg.stages[si]
        first = step0 if si == stage0 else 0
        micro = micro_batch_size(stage, cfg)
        keys = [layout_key(plan_row(r, stage, cfg)) for r in rows]
        sampler = BucketSampler(keys, stage.batch_size, micro, cfg.seed, si)
        inner = torch.optim.AdamW(
            params.values(), lr=stage.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        # Not prepared by accelerate: its scheduler wrapper steps once per process, which would make the
        # LR curve depend on the process count.
        scheduler = torch.optim.lr_scheduler.LambdaLR(inner, stage_lr_multiplier(stage, cfg))
        if first > 0:
            tr.restore_optimizer(inner, scheduler, transformer)
        optimizer = inner if fsdp else accelerator.prepare(inner)
        if main:
            print(
                f"stage {si + 1}/{len(cfg.stages)}: budget {stage.label}, {stage.steps} steps, lr {stage.lr:g}, "
                f"global batch {stage.batch_size} = {world} process(es) × {sampler.per_batch // world} "
                f"micro-batch(es) of {micro}, {len(sampler.buckets)} layouts"
            )
        for step in range(first, stage.steps):
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss_sum = torch.zeros((), device=accelerator.device)
            sigma_sum = torch.zeros((), device=accelerator.device)
            mine = shard(sampler.batch(step), rank, world)
            share = sum(len(m) for m in mine)
            for k, part in enumerate(mine):
                # Gradient accumulation over this process's micro-batches: DDP syncs on the last one only; FSDP2
                # reduce-scatters each (deferring would keep every whole gradient until the last).
                sync = contextlib.nullcontext() if fsdp or k == len(mine) - 1 else accelerator.no_sync(model)
                with sync:
                    slots = [s for s, _ in part]
                    encoded, prompts = zip(*(cache.sample(i, si) for _, i in part))
                    batch = collate(list(encoded), list(prompts), device, torch.float32)
                    noise, sigma = draw_noise_and_sigma(
                        cfg.seed, global_step, slots, batch.x0.shape[1:], cfg.logit_normal
                    )
                    loss, per_sample = flow_matching_loss(model, batch, noise, sigma)
                    # Weighted so the summed gradient is this process's mean; DDP then averages the processes.
                    accelerator.backward(loss * (len(part) / share))
                    loss_sum += per_sample.detach().sum()
                    sigma_sum += sigma.sum().to(loss_sum.device)
            grad_norm = None
            if cfg.max_grad_norm is not None and fsdp:
                grad_norm = clip_grad_norm(list(params.values()), cfg.max_grad_norm)
            elif cfg.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if ema is not None:
                ema.update(params, global_step)
            totals = accelerator.reduce(torch.stack([loss_sum, sigma_sum]), reduction="sum") / stage.batch_size
            seconds = time.perf_counter() - t0
            loss_value = float(totals[0])
            result.losses.append(loss_value)
            if not math.isfinite(loss_value):
                raise UniRefError(
                    f"loss is {loss_value} at step {global_step} (stage {si + 1}): lower the lr or "
                    "enable max_grad_norm; the last checkpoint is intact"
                )
            if global_step % cfg.log_every == 0 or step + 1 == stage.steps:
                log.write(
                    {
                        "kind": "train",
                        "step": global_step,
                        "stage": si + 1,
                        "stage_step": step + 1,
                        "budget": stage.label,
                        "loss": loss_value,
                        "lr": lr,
                        "sigma_mean": float(totals[1]),
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "seconds": seconds,
                        "samples_per_s": stage.batch_size / seconds,
                    }
                )
            bar.update(1)
            bar.set_postfix(stage=si + 1, loss=f"{loss_value:.4f}")

            stage_end = step + 1 == stage.steps
            if stage_end or (cfg.save_every and global_step % cfg.save_every == 0):
                result.checkpoint = save(
                    tr, transformer, ema, None if stage_end else inner, scheduler, si, step + 1, global_step, stage_end
                )
            if not fsdp and (stage_end or (cfg.eval_every and global_step % cfg.eval_every == 0)):
                run_eval(accelerator, cfg, c, transformer, ema, params, val_rows, eval_conds, si, global_step, log)
        accelerator._optimizers = [o for o in accelerator._optimizers if o is not optimizer]  # free its state
    bar.close()
    result.global_step = global_step
    if main:
        plot_loss(log.records(), out / PLOT_FILE, [s.label for s in cfg.stages])
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def save(tr: TrainingRun, transformer, ema, optimizer, scheduler, si, stage_step, global_step, stage_end) -> Path:
    """A checkpoint; at a stage's end without the optimizer (the next stage starts a new one). Under FSDP every
    process writes its own shards: nothing is gathered."""
    fsdp = tr.cfg.fsdp
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        trainable = {n: p.detach() for n, p in named_trainable(transformer).items()}
        state = None if optimizer is None else get_optimizer_state_dict(transformer, optimizer)
    else:
        trainable = trainable_state_dict(transformer)
        state = None if optimizer is None else optimizer.state_dict()
    return tr.save(
        global_step,
        trainable=trainable,
        ema=None if ema is None else ema.state_dict(),
        optimizer=state,
        scheduler=None if optimizer is None else scheduler.state_dict(),
        stage=si,
        stage_step=stage_step,
        stage_end=stage_end,
        sharded=fsdp,
    )


def encode_eval_rows(encoders, cfg: SFTConfig, rows) -> list[list]:
    """The validation rows' conditionings per stage (on the CPU), encoded while the encoders are loaded."""
    pipe = UniRefPipeline(encoders)
    conds = []
    for stage in cfg.stages:
        per_stage = []
        for row in rows[: cfg.eval_samples]:
            per_stage.append(encode_row(pipe, row, stage, cfg, cfg.eval_cfg).to("cpu", torch.float32))
        conds.append(per_stage)
    return conds


def run_eval(accelerator, cfg, components, transformer, ema, params, rows, conds, si, global_step, log) -> None:
    """Sample, grid and score the validation rows on the main process (EMA weights when kept)."""
    if accelerator.is_main_process and conds:
        t0 = time.perf_counter()
        ctx = ema.applied(params) if ema is not None else contextlib.nullcontext()
        with ctx, torch.no_grad(), accelerator.autocast():
            grid, records, means = evaluate(components, transformer, rows, conds[si], cfg, seed=cfg.seed)
        folder = Path(cfg.output_dir) / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{global_step:08d}.png"
        grid.save(path)
        log.write(
            {
                "kind": "eval",
                "step": global_step,
                "stage": si + 1,
                **means,
                "grid": str(path),
                "samples": records,
                "seconds": time.perf_counter() - t0,
            }
        )
        log.image("eval/grid", grid, global_step)
    accelerator.wait_for_everyone()


@exit_on_error
def main(argv=None) -> int:
    return trainer_main(
        argv,
        prog="python -m training.sft",
        description=__doc__.split("\n")[0],
        config_help="JSON or TOML config (see training/sft/config.py)",
        load_config=load_config,
        run=run,
    )
