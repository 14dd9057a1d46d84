"""Checkpoints that are never half-written, and the checks that a resume continues the same run.

A checkpoint is a folder ``<output_dir>/checkpoints/step_00000042/`` holding

- ``trainable.safetensors``: the trained weights (whole transformer, or the LoRA matrices), by name;
- ``ema.safetensors``: their EMA, when ``ema_decay`` is set;
- ``optimizer.pt`` / ``scheduler.pt``: AdamW and LR-schedule state (absent at a stage's end: the next
  stage starts a fresh optimizer, so a stage-end checkpoint does not carry it);
- ``rng_<rank>.json``: python, numpy and torch RNG states of every process;
- ``state.json`` (written last): data position (stage, step), config hash and hashed config, model
  fingerprint, ``sharded``.

A sharded checkpoint (SFT ``"fsdp": true``) holds ``trainable/`` and ``optimizer/`` instead of the two files:
`torch.distributed.checkpoint` folders in its safetensors format, one file per process with that process's rows
of every tensor and their offsets, plus ``optimizer_groups.json`` (the optimizer's hyperparameters). Nothing is
gathered to write them, and any number of processes reads them back (each its own rows; one process: whole
tensors, as the export does); no pickle is involved, unlike the format's default.

It is written into ``step_….tmp`` (each file fsynced), then renamed (`atomic.commit`): a crash at any point
leaves the previous checkpoints as they were and at worst a ``.tmp`` folder that is ignored and replaced later.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from uniref_core.atomic import commit, fsync, tmp_path, write_error
from uniref_core.errors import UniRefError

from .config import HashedConfig, diff_configs

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINABLE_SHARDS = "trainable"
OPTIMIZER_SHARDS = "optimizer"
OPTIMIZER_GROUPS = "optimizer_groups.json"
SCHEDULER_FILE = "scheduler.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Bytes of weight data sampled per file for the model fingerprint (hashing 40 GB would take minutes).
FINGERPRINT_SAMPLES, FINGERPRINT_CHUNK = 32, 4096


class CheckpointError(UniRefError):
    """A checkpoint that cannot be resumed from; the message says what differs."""


# --------------------------------------------------------------------------------------------------
# Model identity
# --------------------------------------------------------------------------------------------------


def model_fingerprint(model_path, parts=("transformer",)) -> str:
    """A short hash of networks of a model folder (default: the transformer): their configs, the safetensors
    headers and evenly spaced samples of the weight bytes. Different weights give a different fingerprint; a
    copied or moved folder keeps it."""
    root = Path(model_path)
    h = hashlib.sha256()
    for rel in ("model_index.json", *(f"{part}/config.json" for part in parts)):
        f = root / rel
        h.update(f.read_bytes() if f.is_file() else b"-")
    for f in sorted(f for part in parts for f in (root / part).glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            # A damaged file is hashed as it is (loading it reports the damage): its header length is capped at
            # the file's size, which a real file's never exceeds, rather than asking read() for up to 2**64 bytes.
            head = fh.read(8)
            header_len = min(int.from_bytes(head, "little"), size - 8) if len(head) == 8 else 0
            h.update(fh.read(header_len))
            start = 8 + header_len
            span = max(size - start - FINGERPRINT_CHUNK, 0)
            for i in range(FINGERPRINT_SAMPLES):
                fh.seek(start + span * i // max(FINGERPRINT_SAMPLES - 1, 1))
                h.update(fh.read(FINGERPRINT_CHUNK))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# RNG states (JSON: readable, and no pickle to load)
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def checkpoint_path(output_dir, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:08d}"


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    fsync(path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``save_file`` and fsync; its I/O errors (a SafetensorError, "… (os error 28) …") become OSErrors."""
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
    fsync(path)


def _torch_save(path: Path, obj) -> None:
    torch.save(obj, path)
    fsync(path)


def save_checkpoint(
    accelerator, final: Path, *, trainable, ema, optimizer, scheduler, state: dict, sharded: bool = False
) -> Path:
    """Write a checkpoint atomically from all processes (each writes its RNG state, and when ``sharded`` its shards
    of ``trainable`` and of the ``optimizer`` state dict; the main process the rest). Not `atomic.atomic_dir`: every
    process writes into the folder between barriers, and only the main one creates and commits it.

    A write that fails (a full disk) removes the unfinished folder, so it holds no space, and ends in a
    CheckpointError that says what to free; the earlier checkpoints are untouched."""
    try:
        return _save_checkpoint(
            accelerator,
            final,
            trainable=trainable,
            ema=ema,
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
            sharded=sharded,
        )
    except _PeerFailed as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp_path(final), ignore_errors=True)
        raise CheckpointError(
            f"checkpoint {final.name} could not be written: {e} (see its error); the earlier checkpoints are "
            "whole, continue with --resume auto once it is fixed"
        ) from None
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp_path(final), ignore_errors=True)
        _agree(accelerator, failed=True)  # the other processes wait for this one at the same point
        error = write_error(
            e,
            f"checkpoint {final.name}",
            final.parent,
            "e.g. delete step_… folders you no "
            "longer need or lower keep_checkpoints, then continue with --resume auto (the "
            "earlier checkpoints are whole)",
        )
        raise CheckpointError(str(error)) from None


class _PeerFailed(Exception):
    """Another process's part of a checkpoint could not be written."""


def _agree(accelerator, failed: bool = False) -> None:
    """A barrier at which every process says whether its writes since the last one succeeded. A process whose
    write failed arrives here from its error handler, so no process waits forever for one that stopped; the others
    then raise too."""
    if accelerator.num_processes == 1:
        return
    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    failures = int(accelerator.reduce(flag, reduction="sum").item())
    if failures and not failed:
        raise _PeerFailed(f"{failures} other process(es) could not write their part")


def _save_checkpoint(
    accelerator, final: Path, *, trainable, ema, optimizer, scheduler, state: dict, sharded: bool
) -> Path:
    tmp = tmp_path(final)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save
        tmp.mkdir(parents=True)
    _agree(accelerator)
    _write_json(tmp / f"rng_{accelerator.process_index}.json", rng_state())
    if sharded:
        save_sharded(tmp / TRAINABLE_SHARDS, trainable)
        if optimizer is not None:
            save_sharded(tmp / OPTIMIZER_SHARDS, optimizer_tensors(optimizer))
    _agree(accelerator)
    if accelerator.is_main_process:
        if sharded:
            fsync(tmp / TRAINABLE_SHARDS)  # the folder's entries (the files are fsynced by the writer)
        else:
            _save_tensors(tmp / TRAINABLE_FILE, trainable)
        if ema is not None:
            _save_tensors(tmp / EMA_FILE, ema)
        if optimizer is not None:
            if sharded:
                _write_json(tmp / OPTIMIZER_GROUPS, optimizer["param_groups"])
            else:
                _torch_save(tmp / OPTIMIZER_FILE, optimizer)
            _torch_save(tmp / SCHEDULER_FILE, scheduler)
        _write_json(tmp / STATE_FILE, {**state, "saved_at": time.time()})
        fsync(tmp)
        commit(tmp, final, durable=True)
    _agree(accelerator)
    return final


def complete_checkpoints(output_dir) -> list[Path]:
    """Finished checkpoints, oldest first (``.tmp`` folders of interrupted saves are not among them)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints plus every stage-end one (the model after each budget)."""
    ckpts = complete_checkpoints(output_dir)
    for p in ckpts[:-keep]:
        if not read_state(p).get("stage_end"):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Reading and resuming
# --------------------------------------------------------------------------------------------------


def read_state(path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def find_checkpoint(resume: str, output_dir) -> Path | None:
    """``auto``: the newest finished checkpoint of ``output_dir`` (None if there is none); else a path."""
    if resume == "auto":
        ckpts = complete_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {resume}: no checkpoint there (no {STATE_FILE}); give a step_… folder "
            f"under {Path(output_dir) / CHECKPOINTS} or 'auto'"
        )
    return path


def check_resume(path: Path, state: dict, cfg: HashedConfig, fingerprint: str) -> None:
    """Refuse a checkpoint of another model or another config, saying which differs."""
    sharded, fsdp = bool(state.get("sharded")), bool(getattr(cfg, "fsdp", False))
    if sharded and getattr(cfg, "lora", None) is not None:
        raise CheckpointError(
            f"cannot resume from {path}: it is a sharded full fine-tune (an FSDP run), which a LoRA "
            f"run cannot continue. Export it (python -m training.export --checkpoint {path} --out "
            "DIR) and start the LoRA run from DIR as its model"
        )
    if sharded != fsdp:
        how = (
            'holds sharded weights (an FSDP run): resume it with "fsdp": true, at any number of processes'
            if sharded
            else 'holds whole weights (a run without FSDP): resume it with "fsdp": false'
        )
        raise CheckpointError(f"cannot resume from {path}: it {how}, or export it and start a new run from the export")
    problems = []
    if state["model"]["fingerprint"] != fingerprint:
        problems.append(
            f"it was trained from another model ({state['model']['path']}, fingerprint "
            f"{state['model']['fingerprint']}) than this config's {cfg.model} (fingerprint {fingerprint})"
        )
    if state["config_hash"] != cfg.hash():
        diffs = diff_configs(state["config"], json.loads(json.dumps(cfg.hashed_dict(), default=str)))
        problems.append("its config differs in " + "; ".join(diffs or ["(hash only)"]))
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: "
            + ", and ".join(problems)
            + ". Resume with the config and model it was trained with, or use a new output_dir."
        )


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor] | None:
    f = Path(path) / name
    return load_file(str(f)) if f.is_file() else None


def load_torch(path: Path, name: str):
    f = Path(path) / name
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def load_optimizer(path: Path):
    """The optimizer state of an unsharded checkpoint (the same on every process)."""
    return load_torch(path, OPTIMIZER_FILE)


def load_rng(path: Path, rank: int) -> dict | None:
    f = Path(path) / f"rng_{rank}.json"
    return json.loads(f.read_text()) if f.is_file() else None


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): torch.distributed.checkpoint in its safetensors format
# --------------------------------------------------------------------------------------------------


def save_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every process writes its rows of ``tensors`` (DTensors; plain tensors once) into ``folder``: a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    if tensors:  # a stateless optimizer (plain SGD) has nothing to write
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def load_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` in place from a sharded folder written at any process count: DTensors get this process's
    rows, plain tensors the whole tensor (a single process with no process group included)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not tensors:
        return
    try:
        with warnings.catch_warnings():  # one process without a process group is what the export means to do
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist.is_initialized())
    except Exception as e:  # DCP wraps each process's error in a CheckpointException
        raise CheckpointError(
            f"{folder} does not hold these weights ({str(e).strip().splitlines()[-1][:300]}): "
            "it is not a sharded checkpoint of this model and config"
        ) from e


def sharded_keys(folder: Path) -> set[str]:
    """The names of the tensors in a sharded folder (read from the safetensors headers); none if it is absent."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not Path(folder).is_dir():
        return set()
    return set(HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata)


def optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of an optimizer state dict keyed by parameter name (`get_optimizer_state_dict`), flat:
    ``<parameter>.<state>`` such as ``transformer_blocks.0.attn.to_q.weight.exp_avg``."""
    return {f"{name}.{key}": value for name, per in state["state"].items() for key, value in per.items()}


def load_sharded_optimizer(path: Path, model, optimizer) -> None:
    """This process's shard of the optimizer state of a sharded checkpoint, at any process count."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = get_optimizer_state_dict(model, optimizer)  # allocates this process's state (a step with lr 0)
    saved = sharded_keys(Path(path) / OPTIMIZER_SHARDS)
    # Weights that never had a gradient (the last block's text stream) have no state, as in the uninterrupted run.
    state["state"] = {name: per for name, per in state["state"].items() if all(f"{name}.{k}" in saved for k in per)}
    load_sharded(Path(path) / OPTIMIZER_SHARDS, optimizer_tensors(state))
    groups = json.loads((Path(path) / OPTIMIZER_GROUPS).read_text())
    # JSON turned tuples (betas) into lists
    state["param_groups"] = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in groups
    ]
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(strict=False))
