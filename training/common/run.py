"""What the SFT and MSGRPO trainers share about one run: its folder, the checks before any model work, the
checkpoint it resumes from, its logger, and writing and pruning its atomic checkpoints.

    run = TrainingRun(cfg, accelerator, resume, kind="sft")   # refuses another model's or config's checkpoint
    if run.resumed: load_trainable_state_dict(transformer, run.tensors(ckpt_mod.TRAINABLE_FILE))
    ...
    run.save(global_step, trainable=..., optimizer=..., scheduler=..., stage=si, stage_step=n, stage_end=end)

A trainer keeps its own loop (SFT: stages of batches; RL: rollouts, rewards, the policy update); everything a
checkpoint holds, and how a run restarts from one, is decided here once.
"""

from __future__ import annotations

import json
from pathlib import Path

from uniref_core.model import check_model_folder

from . import checkpoint as ckpt_mod
from .logging_utils import RunLogger


class TrainingRun:
    """One training run in ``cfg.output_dir`` on the processes of ``accelerator``."""

    def __init__(self, cfg, accelerator, resume: str | None, kind: str):
        self.cfg, self.accelerator, self.kind = cfg, accelerator, kind
        self.main, self.rank, self.world = (
            accelerator.is_main_process,
            accelerator.process_index,
            accelerator.num_processes,
        )
        self.out = Path(cfg.output_dir)
        check_model_folder(cfg.model)
        self.fingerprint = ckpt_mod.model_fingerprint(cfg.model)
        self.checkpoint: Path | None = None
        self.state: dict | None = None
        if resume:
            self.checkpoint = ckpt_mod.find_checkpoint(resume, self.out)
            if self.checkpoint is not None:
                self.state = ckpt_mod.read_state(self.checkpoint)
                ckpt_mod.check_resume(self.checkpoint, self.state, cfg, self.fingerprint)
            elif self.main:
                print(f"resume: no checkpoint in {self.out / ckpt_mod.CHECKPOINTS}, starting from scratch")
        self.log = RunLogger(self.out, enabled=self.main, tensorboard=cfg.tensorboard)
        if not self.resumed:
            self.log.start_fresh()
        for note in self.log.notes:
            print(note)
        if self.main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))

    @property
    def resumed(self) -> bool:
        return self.state is not None

    @property
    def global_step(self) -> int:
        """The step the run continues after (0 for a fresh run)."""
        return self.state["global_step"] if self.state else 0

    def tensors(self, name: str):
        """A tensor file of the checkpoint resumed from (None if it has none)."""
        return ckpt_mod.load_tensors(self.checkpoint, name)

    @property
    def sharded(self) -> bool:
        """Whether the checkpoint resumed from is sharded (an FSDP run's; `check_resume` matched it to the config)."""
        return bool(self.state and self.state.get("sharded"))

    def restore_optimizer(self, optimizer, scheduler, model=None) -> None:
        """The optimizer state (this process's shard of it, from a sharded checkpoint: ``model`` is the sharded
        model) and the LR schedule's position, from the checkpoint resumed from."""
        if self.sharded:
            ckpt_mod.load_sharded_optimizer(self.checkpoint, model, optimizer)
        else:
            optimizer.load_state_dict(ckpt_mod.load_optimizer(self.checkpoint))
        scheduler.load_state_dict(ckpt_mod.load_torch(self.checkpoint, ckpt_mod.SCHEDULER_FILE))

    def continue_after_checkpoint(self) -> None:
        """On resume: this process's random state back, and the log cut at the checkpoint's step (a killed run
        may have logged steps after it)."""
        rng = ckpt_mod.load_rng(self.checkpoint, self.rank)
        if rng is not None:
            ckpt_mod.set_rng_state(rng)
        self.log.truncate_after(self.global_step)

    def save(
        self,
        global_step: int,
        *,
        trainable,
        ema=None,
        optimizer=None,
        scheduler=None,
        stage: int = 0,
        stage_step: int | None = None,
        stage_end: bool = False,
        sharded: bool = False,
    ) -> Path:
        """An atomic checkpoint of step ``global_step`` (every process calls it), then the oldest pruned.
        ``sharded``: ``trainable`` holds DTensors and ``optimizer`` is `get_optimizer_state_dict`'s (FSDP)."""
        cfg = self.cfg
        state = {
            "global_step": global_step,
            "stage": stage,
            "stage_step": global_step if stage_step is None else stage_step,
            "stage_end": stage_end,
            "kind": self.kind,
            "config_hash": cfg.hash(),
            "config": json.loads(json.dumps(cfg.hashed_dict(), default=str)),
            "model": {"path": str(cfg.model), "fingerprint": self.fingerprint},
            "lora": None if cfg.lora is None else {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha},
            "world_size": self.world,
            "sharded": sharded,
        }
        path = ckpt_mod.save_checkpoint(
            self.accelerator,
            ckpt_mod.checkpoint_path(self.out, global_step),
            trainable=trainable,
            ema=ema,
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
            sharded=sharded,
        )
        if self.main:
            ckpt_mod.prune_checkpoints(self.out, cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path
