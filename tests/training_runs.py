"""What the trainer tests share (tests/test_sft.py, test_fsdp.py, test_msgrpo.py, test_train_memory.py): 64 px
ShapeCompose manifests, small SFT and MSGRPO configs, the reward plug-ins their runs trust, and launching a run
over two processes. A plugin of tests/conftest.py, so its fixtures are there for every test module by name; the
training packages are imported where used, so a test session that trains nothing does not load them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def reset_accelerate_state() -> None:
    """Each in-process run creates its own Accelerator; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Used by every test of a trainer module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    yield
    reset_accelerate_state()


# -- SFT -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Train (K = 1 and 2, edits and compositions) and val manifests of 64 px ShapeCompose samples."""
    from training.tasks.shapecompose import make_split, write_manifest

    root = tmp_path_factory.mktemp("shapecompose")
    edits = make_split("train", 6, size=64, kinds=("recolour", "move", "remove"))
    compositions = make_split("train", 2, size=64, ks=(2,), kinds=("compose",), start=6)
    train = write_manifest(edits + compositions, root / "train")
    val = write_manifest(make_split("val", 2, size=64, ks=(1, 2)), root / "val")
    return {"train": str(train), "val": str(val)}


def make_config(model, data, out, **over) -> dict:
    """A small two-stage config: budgets 64² → 96², 64² outputs, tiny VL copies, 2 steps each."""
    cfg = {
        "model": str(model),
        "train_manifest": data["train"],
        "val_manifest": data["val"],
        "output_dir": str(out),
        "stages": [
            {"budget": 64, "steps": 2, "lr": 1e-3, "batch_size": 2, "output_size": 64},
            {"budget": 96, "steps": 2, "lr": 5e-4, "batch_size": 2, "output_size": 64},
        ],
        "vl_budget": 56,
        "eval_samples": 0,
        "tensorboard": False,
        "seed": 3,
    }
    cfg.update(over)
    return cfg


def write_config(path, cfg) -> Path:
    path = Path(path)
    path.write_text(json.dumps(cfg))
    return path


def run_sft(cfg: dict, resume=None):
    from training.sft import run
    from training.sft.config import config_from_dict

    return run(config_from_dict(cfg), resume=resume)


def train_records(out) -> list[dict]:
    rows = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def final_weights(out) -> dict:
    from training.common import checkpoint as ckpt_mod

    return ckpt_mod.load_tensors(ckpt_mod.complete_checkpoints(out)[-1], ckpt_mod.TRAINABLE_FILE)


# A child process that runs the SFT trainer on a config (argv 1) and hangs right after it committed checkpoint N
# (argv 3), once it has written the marker file (argv 2): the test then kills it there.
KILL_CHILD = """
import sys, time
from pathlib import Path
from training.common import checkpoint
from training.sft import trainer

save, marker, stop_at = checkpoint.save_checkpoint, Path(sys.argv[2]), int(sys.argv[3])

def save_then_hang(accelerator, final, **kw):
    path = save(accelerator, final, **kw)
    if final.name == f"step_{stop_at:08d}":
        marker.write_text("saved")
        time.sleep(600)  # killed here, between steps, with the checkpoint on disk
    return path

checkpoint.save_checkpoint = save_then_hang
sys.exit(trainer.main(["--config", sys.argv[1]]))
"""


# -- MSGRPO ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from training.tasks.shapecompose import make_split, write_manifest

    root = tmp_path_factory.mktemp("rl_prompts")
    return str(write_manifest(make_split("train", 4, size=64, ks=(2,), kinds=("compose",)), root / "train"))


# This module's reward sources, trusted as a user trusts their own plug-in (--trust-module).
TRUSTED = ("tests.training_runs",)


def custom_source(offset=0.0):
    """A plug-in named by dotted path: one 'other' signal."""
    from training.rewards import RewardBatch, Signal

    def source(images, row):
        return RewardBatch({"brightness": Signal(np.array([np.asarray(im).mean() / 255 + offset for im in images]))})

    return source


def constant_source():
    from training.rewards import RewardBatch, Signal

    def source(images, row):
        return RewardBatch({"same": Signal(np.ones(len(images)))})

    return source


def rl_config(model, manifest, out, **over) -> dict:
    cfg = {
        "model": str(model),
        "train_manifest": manifest,
        "output_dir": str(out),
        "steps": 2,
        "lr": 1e-3,
        "group_size": 3,
        "groups_per_step": 2,
        "rollout_steps": 4,
        "sde_window": [0, 2],
        "budget": 64,
        "output_size": 64,
        "vl_budget": 56,
        "tensorboard": False,
        "grid_every": 1,
        "seed": 1,
        # A random tiny model often scores 0 on every checker signal; brightness always varies, so groups teach.
        "rewards": [{"source": "checker"}, {"source": "tests.training_runs:custom_source", "weight": 0.5}],
    }
    cfg.update(over)
    return cfg


# -- two processes ---------------------------------------------------------------------------------------------------


def torchrun(port: str) -> list[str]:
    """The arguments that start ``torchrun --nproc_per_node 2`` (each test its own port: runs may overlap)."""
    return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]


def launch(launcher: list[str], *args: str) -> subprocess.Popen:
    """``python LAUNCHER ARGS…`` from the repository, on the CPU with one thread per process; output piped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a launched run; fail with its stderr unless it exits 0. Returns its stdout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    return out
