"""SFT full fine-tuning sharded with FSDP2 (``"fsdp": true``) over 2 processes on the CPU (torchrun, gloo).

The runs step with SGD with momentum (tests/sgd.py): its update is linear in the gradients, so runs over different
process counts end within rounding of each other, and it has a state that a resume must restore.
"""

import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.sgd import assert_same_updates, sgd_script, start_weights, use_sgd
from tests.training_runs import (
    KILL_CHILD,
    final_weights,
    finish,
    launch,
    make_config,
    run_sft,
    torchrun,
    train_records,
    write_config,
)
from training.common import checkpoint as ckpt_mod
from training.common.config import ConfigError
from training.sft.config import config_from_dict

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

MOMENTUM = 0.9
TORCHRUN = torchrun("29531")
# Stage 1 has 3 steps so that checkpoint 2 falls mid-stage, with the optimizer's state in it; max_grad_norm below
# the measured gradient norms (~0.9), so clipping over the shards is part of what is compared.
STAGES = [
    {"budget": 64, "steps": 3, "lr": 1e-2, "batch_size": 2, "output_size": 64},
    {"budget": 96, "steps": 2, "lr": 5e-3, "batch_size": 2, "output_size": 64},
]


def fsdp_config(model, data, out, **over) -> dict:
    over = {
        "stages": STAGES,
        "save_every": 1,
        "keep_checkpoints": 5,
        "max_grad_norm": 0.5,
        "gradient_checkpointing": True,
        "fsdp": True,
        **over,
    }
    return make_config(model, data, out, **over)


def kill_with_workers(launcher) -> None:
    """SIGKILL a torchrun launcher and its workers (each in a session of its own, so not its process group)."""
    tasks = Path(f"/proc/{launcher.pid}/task").glob("*/children")
    workers = [int(pid) for f in tasks for pid in f.read_text().split()]
    launcher.kill()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)


def sharded_weights(checkpoint, like: dict) -> dict:
    """Whole tensors read back from a sharded checkpoint by this one process."""
    weights = {n: torch.empty_like(t) for n, t in like.items()}
    ckpt_mod.load_sharded(checkpoint / ckpt_mod.TRAINABLE_SHARDS, weights)
    return weights


@pytest.fixture(scope="module")
def runs(tiny_model, data, tmp_path_factory):
    """The same config trained by one process without FSDP and by two processes with it."""
    root = tmp_path_factory.mktemp("fsdp")
    two, one = fsdp_config(tiny_model, data, root / "two"), fsdp_config(tiny_model, data, root / "one", fsdp=False)
    proc = launch(
        TORCHRUN, sgd_script(root, MOMENTUM), "training.sft", "--config", str(write_config(root / "two.json", two))
    )
    with pytest.MonkeyPatch.context() as mp:
        use_sgd(mp, MOMENTUM)
        run_sft(one)  # meanwhile
    stdout = finish(proc)
    return {
        "one": root / "one",
        "two": root / "two",
        "configs": {"one": one, "two": two},
        "stdout": stdout,
        "start": start_weights(tiny_model),
    }


def test_two_processes_hold_half_the_weights_each_and_train_as_one_process(runs, tmp_path):
    from training.export import export
    from uniref_core import UniRefPipeline

    # Each process holds half of every weight: the trainer says so, and each writes its half to the checkpoint.
    assert "FSDP: process 0 of 2 holds 647,488 of the 1,294,976 weights (50.0%)" in runs["stdout"]
    assert "FSDP: process 1 of 2 holds 647,488 of the 1,294,976 weights (50.0%)" in runs["stdout"]
    last = ckpt_mod.complete_checkpoints(runs["two"])[-1]
    files = sorted((last / ckpt_mod.TRAINABLE_SHARDS).glob("*.safetensors"))
    assert len(files) == 2 and not (last / ckpt_mod.TRAINABLE_FILE).exists()
    for rank, file in enumerate(files):
        with safe_open(file, "pt") as f:
            for name, whole in runs["start"].items():
                rows = math.ceil(whole.shape[0] / 2)
                expected = rows if rank == 0 else whole.shape[0] - rows
                assert f.get_slice(name).get_shape() == [expected, *whole.shape[1:]], (file.name, name)

    # The same training as one process without FSDP: losses to rtol 1e-5, weight updates to 1e-4 of the largest.
    one, two = train_records(runs["one"]), train_records(runs["two"])
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=0
    )
    assert all(r["grad_norm"] > 0.5 for r in two)  # clipped: the norm is taken over both processes' shards
    torch.testing.assert_close(
        torch.tensor([r["grad_norm"] for r in two]), torch.tensor([r["grad_norm"] for r in one]), rtol=1e-5, atol=0
    )

    # The export gathers nothing at training time: it reads both files into an ordinary diffusers folder.
    exported = export(last, tmp_path / "exported")
    pipe = UniRefPipeline.from_pretrained(exported)
    weights = {n: p.detach() for n, p in pipe.c.transformer.named_parameters()}
    assert_same_updates(runs["start"], final_weights(runs["one"]), weights)


@pytest.fixture(scope="module")
def killed(tiny_model, data, runs, tmp_path_factory):
    """The two-process run killed (SIGKILL, every process) right after it committed checkpoint 2."""
    root = tmp_path_factory.mktemp("killed")
    cfg = fsdp_config(tiny_model, data, root / "run")
    config = write_config(root / "run.json", cfg)
    marker = root / "saved"
    child = launch(TORCHRUN, sgd_script(root, MOMENTUM, then=KILL_CHILD), str(config), str(marker), "2")
    try:
        deadline = time.time() + 180
        while not marker.exists():
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.time() < deadline, "the run never wrote checkpoint 2"
            time.sleep(0.05)
        time.sleep(1)  # both workers past the save, asleep
    finally:
        kill_with_workers(child)
        child.communicate(timeout=30)
    assert [p.name for p in ckpt_mod.complete_checkpoints(root / "run")][-1] == "step_00000002"
    assert (ckpt_mod.checkpoint_path(root / "run", 2) / ckpt_mod.OPTIMIZER_SHARDS).is_dir()  # mid-stage
    return cfg


def resumable_copy(killed, out: Path) -> dict:
    """The killed run's folder copied to ``out`` (each test resumes its own copy) and its config for there."""
    shutil.copytree(killed["output_dir"], out)
    cfg = {**killed, "output_dir": str(out)}
    write_config(out.with_suffix(".json"), cfg)
    return cfg


def test_sigkill_then_resume_at_two_processes_ends_with_the_same_weights(killed, runs, tmp_path):
    out = tmp_path / "two"
    resumable_copy(killed, out)
    proc = launch(
        TORCHRUN,
        sgd_script(tmp_path, MOMENTUM),
        "training.sft",
        "--config",
        str(out.with_suffix(".json")),
        "--resume",
        "auto",
    )
    assert "resumed from" in finish(proc)
    assert [r["loss"] for r in train_records(out)] == [r["loss"] for r in train_records(runs["two"])]
    a = sharded_weights(ckpt_mod.complete_checkpoints(out)[-1], runs["start"])
    b = sharded_weights(ckpt_mod.complete_checkpoints(runs["two"])[-1], runs["start"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_a_two_process_checkpoint_resumes_in_one_process(killed, runs, tmp_path, monkeypatch):
    """Resharded on load: the weights and the optimizer's momentum of both halves go to the one process."""
    out = tmp_path / "one"
    cfg = resumable_copy(killed, out)
    use_sgd(monkeypatch, MOMENTUM)
    result = run_sft(cfg, resume="auto")
    assert result.global_step == 5 and len(result.losses) == 3
    records = train_records(out)
    assert ckpt_mod.read_state(ckpt_mod.complete_checkpoints(out)[-1])["world_size"] == 1
    losses = [r["loss"] for r in train_records(runs["one"])]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in records]), torch.tensor(losses), rtol=1e-5, atol=0)
    weights = sharded_weights(ckpt_mod.complete_checkpoints(out)[-1], runs["start"])
    assert_same_updates(runs["start"], final_weights(runs["one"]), weights)


def test_fsdp_refuses_lora_ema_and_checkpoints_of_the_other_kind(tiny_model, data, runs, tmp_path):
    with pytest.raises(ConfigError, match="fsdp is for a full fine-tune"):
        config_from_dict(fsdp_config(tiny_model, data, tmp_path, lora={"rank": 4, "alpha": 4}))
    with pytest.raises(ConfigError, match="ema_decay is set with fsdp"):
        config_from_dict(fsdp_config(tiny_model, data, tmp_path, ema_decay=0.9))
    one, two = runs["configs"]["one"], runs["configs"]["two"]
    with pytest.raises(ckpt_mod.CheckpointError, match="sharded full fine-tune .* a LoRA run cannot continue"):
        run_sft({**two, "fsdp": False, "lora": {"rank": 4, "alpha": 4}}, resume="auto")
    with pytest.raises(ckpt_mod.CheckpointError, match='holds sharded weights .* resume it with "fsdp": true'):
        run_sft({**two, "fsdp": False}, resume="auto")
    with pytest.raises(ckpt_mod.CheckpointError, match='holds whole weights .* resume it with "fsdp": false'):
        run_sft({**one, "fsdp": True}, resume="auto")


def test_bf16_gathers_bf16_blocks_and_keeps_the_loss_of_autocast(tiny_model, data, tmp_path, monkeypatch):
    """Under mixed_precision bf16 the blocks are gathered in bf16 (what autocast casts them to for every matmul)
    and reduced in fp32: the loss stays that of one process's autocast run to bf16 rounding (measured 1.3e-4
    relative, against 6e-4 between bf16 and fp32 runs)."""
    stages = [{**STAGES[0], "steps": 2}]
    two = fsdp_config(tiny_model, data, tmp_path / "two", stages=stages, mixed_precision="bf16", save_every=0)
    config = write_config(tmp_path / "two.json", two)
    proc = launch(TORCHRUN, sgd_script(tmp_path, MOMENTUM), "training.sft", "--config", str(config))
    use_sgd(monkeypatch, MOMENTUM)
    run_sft({**two, "output_dir": str(tmp_path / "one"), "fsdp": False})
    finish(proc)
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]), rtol=5e-4, atol=0
    )
