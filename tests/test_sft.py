"""SFT trainer on tiny models and small ShapeCompose manifests at 64² (training/sft/ and friends)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training_runs import (
    KILL_CHILD,
    final_weights,
    finish,
    launch,
    make_config,
    reset_accelerate_state,
    run_sft,
    torchrun,
    train_records,
    write_config,
)
from training.common import checkpoint as ckpt_mod
from training.common.config import ConfigError
from training.common.data import layout_key, load_rows, plan_row
from training.sft.config import config_from_dict, load_config
from training.sft.data import BucketSampler, SampleEncoder, collate, shard
from uniref_core.errors import UniRefError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def smoke_run(tiny_model, data, tmp_path_factory):
    """Full fine-tune, two stages of 2 steps, micro-batches of 2 (one layout, padded prompts), EMA,
    TensorBoard, a checkpoint every step, evaluations."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    cfg = make_config(
        tiny_model,
        data,
        out,
        ema_decay=0.9,
        save_every=1,
        keep_checkpoints=3,
        eval_samples=2,
        eval_steps=2,
        tensorboard=True,
        micro_batch_size=2,
    )
    result = run_sft(cfg)
    reset_accelerate_state()
    return cfg, result


# 1. -------------------------------------------------------------------------------------------------


def test_two_stage_smoke_run_logs_checkpoints_and_exports(smoke_run, tmp_path):
    from training.export import export
    from uniref_core import UniRefPipeline

    cfg, result = smoke_run
    out = Path(cfg["output_dir"])
    assert result.global_step == 4 and len(result.losses) == 4
    assert all(torch.isfinite(torch.tensor(result.losses)))
    records = train_records(out)
    assert [r["stage"] for r in records] == [1, 1, 2, 2]
    assert {"loss", "lr", "sigma_mean", "seconds", "samples_per_s"} <= set(records[0])
    assert (out / "loss.png").is_file() and list((out / "tensorboard").glob("events.out.tfevents.*"))
    grids = sorted((out / "eval").glob("*.png"))
    assert [g.name for g in grids] == ["step_00000002.png", "step_00000004.png"]  # one per stage end
    evals = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert all(0.0 <= e["overall"] <= 1.0 for e in evals)  # the checker scored the samples
    ckpts = [p.name for p in ckpt_mod.complete_checkpoints(out)]
    assert ckpts == ["step_00000002", "step_00000003", "step_00000004"]  # newest 3 (+ stage ends)
    last = ckpt_mod.complete_checkpoints(out)[-1]
    assert (last / "ema.safetensors").is_file() and not (last / "optimizer.pt").exists()  # stage end
    assert (ckpt_mod.complete_checkpoints(out)[-2] / "optimizer.pt").is_file()

    model = export(last, tmp_path / "exported")
    pipe = UniRefPipeline.from_pretrained(model)
    ema = ckpt_mod.load_tensors(last, ckpt_mod.EMA_FILE)
    torch.testing.assert_close(pipe.c.transformer.state_dict()["img_in.weight"], ema["img_in.weight"])
    refs = json.loads(Path(cfg["train_manifest"]).read_text().splitlines()[0])["references"]
    base = Path(cfg["train_manifest"]).parent
    edit = pipe.edit(
        [base / r for r in refs],
        "Put the red circle on the left.",
        steps=2,
        cfg=1.0,
        budget=64 * 64,
        width=64,
        height=64,
    )
    assert edit.images[0].size == (64, 64)


@pytest.fixture(scope="module")
def lora_run(tiny_model, data, tmp_path_factory):
    """A LoRA run (rank 4, alpha 8, one stage of 2 steps) exported both ways."""
    from training.export import export

    root = tmp_path_factory.mktemp("lora")
    cfg = make_config(tiny_model, data, root / "run", lora={"rank": 4, "alpha": 8})
    cfg["stages"] = cfg["stages"][:1]
    run_sft(cfg)
    reset_accelerate_state()
    last = ckpt_mod.complete_checkpoints(root / "run")[-1]
    return cfg, last, export(last, root / "lora.safetensors", lora_only=True), export(last, root / "merged")


def test_lora_export_in_comfyui_key_format_merges_to_the_trained_model(tiny_model, lora_run):
    from safetensors.torch import load_file

    from training.common.trainable import load_trainable_state_dict, setup_transformer
    from uniref_core import UniRefPipeline
    from uniref_core.pipeline import predict_velocity

    cfg, last, lora_file, merged_dir = lora_run
    lora = load_file(lora_file)
    key = re.compile(
        r"^diffusion_model\.transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
        r"|(img|txt)_mlp\.net\.(0\.proj|2))\.(lora_A\.weight|lora_B\.weight|alpha)$"
    )
    assert lora and all(key.match(k) for k in lora), [k for k in lora if not key.match(k)][:3]
    assert len(lora) == 2 * 12 * 3 and float(lora["diffusion_model.transformer_blocks.0.attn.to_q.alpha"]) == 8.0

    # The merged export computes what the peft-wrapped training transformer computes.
    merged = UniRefPipeline.from_pretrained(merged_dir).c.transformer
    base = UniRefPipeline.from_pretrained(tiny_model).c.transformer
    live = UniRefPipeline.from_pretrained(tiny_model).c.transformer
    setup_transformer(live, config_from_dict(cfg).lora, False)
    load_trainable_state_dict(live, ckpt_mod.load_tensors(last, ckpt_mod.TRAINABLE_FILE))
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)
    emb = torch.randn(1, 7, 64, generator=g)
    shapes = [[(1, 4, 4), (1, 4, 4)]]
    with torch.no_grad():
        a = predict_velocity(live.eval(), x, 500.0, [ref], emb, None, shapes)
        b = predict_velocity(merged, x, 500.0, [ref], emb, None, shapes)
        untrained = predict_velocity(base, x, 500.0, [ref], emb, None, shapes)
    assert not torch.allclose(a, untrained)  # the LoRA changed something…
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # …and the merge reproduces it


COMFY_LORA_CHECK = """
import comfy.lora
from safetensors.torch import load_file

lora, base, merged = (load_file(p) for p in args)
# comfy/lora.py model_lora_keys_unet, for a QwenImage model: the generic 'diffusion_model.<path>' key
# plus '<path>' and 'transformer.<path>' for every '<path>.weight' of the diffusion model.
to_load = {}
for k in base:
    if k.endswith(".weight"):
        path = k[: -len(".weight")]
        for alias in ("diffusion_model." + path, path, "transformer." + path):
            to_load[alias] = "diffusion_model." + k
patches = comfy.lora.load_lora(lora, to_load)
worst = 0.0
for target, adapter in patches.items():
    k = target[len("diffusion_model."):]
    w = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], base[k].clone(), target)
    worst = max(worst, float((w - merged[k]).abs().max()))
print(json.dumps({"layers": len(patches), "max_diff": worst}))
"""


@pytest.mark.comfy
@pytest.mark.parametrize("version", ["0.30.0", "0.3.75"])
def test_comfyui_applies_the_exported_lora_like_the_merged_export(tiny_model, lora_run, version):
    """ComfyUI's own LoRA loader (inside a real host's tree and interpreter) reads the file."""
    from comfy_child import last_json, run_in_host

    _, _, lora_file, merged_dir = lora_run
    paths = [
        str(lora_file),
        str(Path(tiny_model) / "transformer" / "diffusion_pytorch_model.safetensors"),
        str(Path(merged_dir) / "transformer" / "diffusion_pytorch_model.safetensors"),
    ]
    result = last_json(run_in_host(version, COMFY_LORA_CHECK, paths))
    assert result["layers"] == 2 * 12  # every adapted layer of both blocks
    assert result["max_diff"] < 1e-6


# 2. -------------------------------------------------------------------------------------------------


def test_two_processes_give_the_loss_curve_of_one(tiny_model, data, tmp_path, monkeypatch):
    """Same global batch of 2 micro-batches of 1: one process accumulates both, two processes take
    one each. The loss curves agree to rtol 1e-5 (measured: identical to the last bit over 4 steps).

    Bit equality is not promised: one process adds the two halves' gradients in autograd, two
    processes average them through gloo's all-reduce and run single-threaded under torchrun, so
    float32 rounding may differ (~1e-7 relative). 1e-5 is far below the loss's own step-to-step
    change (~1e-2): a wrong shard, noise draw or loss scaling would fail it. The weights are compared
    after plain SGD steps (tests/sgd.py), whose updates are the summed gradients themselves.
    """
    from tests.sgd import assert_same_updates, sgd_script, start_weights, use_sgd

    use_sgd(monkeypatch)
    cfg1 = make_config(tiny_model, data, tmp_path / "one")
    run_sft(cfg1)
    cfg2 = make_config(tiny_model, data, tmp_path / "two")
    config = write_config(tmp_path / "two.json", cfg2)
    stdout = finish(launch(torchrun("29517"), sgd_script(tmp_path), "training.sft", "--config", str(config)))
    assert "2 process(es)" in stdout
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=0
    )
    assert_same_updates(start_weights(tiny_model), final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))


# 3. -------------------------------------------------------------------------------------------------


def test_sigkill_after_a_checkpoint_then_resume_ends_with_the_same_weights(tiny_model, data, tmp_path):
    stages = [
        {"budget": 64, "steps": 3, "lr": 1e-3, "batch_size": 2, "output_size": 64},
        {"budget": 96, "steps": 2, "lr": 5e-4, "batch_size": 2, "output_size": 64},
    ]
    killed = make_config(tiny_model, data, tmp_path / "killed", stages=stages, save_every=1, ema_decay=0.9)
    config = write_config(tmp_path / "killed.json", killed)
    marker = tmp_path / "saved"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(config), str(marker), "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the child never wrote checkpoint 2"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert [p.name for p in ckpt_mod.complete_checkpoints(tmp_path / "killed")][-1] == "step_00000002"

    # Resume mid-stage (optimizer, schedule, EMA, data position) and run on through the next stage.
    result = run_sft(killed, resume="auto")
    assert result.global_step == 5 and len(result.losses) == 3
    straight = make_config(tiny_model, data, tmp_path / "straight", stages=stages, ema_decay=0.9)
    run_sft(straight)
    a, b = final_weights(tmp_path / "killed"), final_weights(tmp_path / "straight")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    ema_a = ckpt_mod.load_tensors(ckpt_mod.complete_checkpoints(tmp_path / "killed")[-1], ckpt_mod.EMA_FILE)
    ema_b = ckpt_mod.load_tensors(ckpt_mod.complete_checkpoints(tmp_path / "straight")[-1], ckpt_mod.EMA_FILE)
    for name in ema_a:
        torch.testing.assert_close(ema_a[name], ema_b[name], rtol=0, atol=0)
    assert [r["loss"] for r in train_records(tmp_path / "killed")] == [
        r["loss"] for r in train_records(tmp_path / "straight")
    ]


# 4. -------------------------------------------------------------------------------------------------


def test_crash_during_save_leaves_the_previous_checkpoint_loadable(tiny_model, data, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    cfg = make_config(tiny_model, data, out, save_every=1, stages=[make_config(tiny_model, data, out)["stages"][0]])
    commit = ckpt_mod.commit

    def crash(tmp, final, **kw):
        if final.name == "step_00000002":
            raise RuntimeError("crash (simulated) after the files were written")
        commit(tmp, final, **kw)

    monkeypatch.setattr(ckpt_mod, "commit", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        run_sft(cfg)
    root = out / ckpt_mod.CHECKPOINTS
    assert (root / "step_00000002.tmp" / "trainable.safetensors").is_file()  # half a save, never renamed
    assert not (root / "step_00000002").exists()
    found = ckpt_mod.find_checkpoint("auto", out)
    assert found.name == "step_00000001"
    assert ckpt_mod.read_state(found)["global_step"] == 1
    assert ckpt_mod.load_tensors(found, ckpt_mod.TRAINABLE_FILE) and ckpt_mod.load_torch(
        found, ckpt_mod.OPTIMIZER_FILE
    )

    monkeypatch.setattr(ckpt_mod, "commit", commit)
    reset_accelerate_state()
    assert run_sft(cfg, resume="auto").global_step == 2  # the leftover .tmp is replaced
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_half_checkpoint(
    tiny_model, data, tmp_path, monkeypatch, capsys
):
    from safetensors import SafetensorError

    from training.sft.trainer import main

    out = tmp_path / "full"
    cfg = make_config(tiny_model, data, out, save_every=1, stages=[make_config(tiny_model, data, out)["stages"][0]])
    path = write_config(tmp_path / "sft.json", cfg)
    real_save = ckpt_mod.save_file

    def disk_full(tensors, filename, *args, **kw):
        if Path(filename).parent.name == "step_00000002.tmp":
            Path(filename).write_bytes(b"half a file")
            raise SafetensorError(
                f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"'
            )  # what safetensors raises
        return real_save(tensors, filename, *args, **kw)

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        f"error: checkpoint step_00000002 could not be written: the disk holding {out / 'checkpoints'} is full "
        "(No space left on device); free space there, e.g. delete step_… folders you no longer need or lower "
        "keep_checkpoints, then continue with --resume auto" in err
    )
    root = out / ckpt_mod.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # the unfinished folder is gone, space freed
    assert ckpt_mod.load_tensors(ckpt_mod.find_checkpoint("auto", out), ckpt_mod.TRAINABLE_FILE)

    # A full disk met by any other write of the run (here the log) is one line too, naming the file.
    monkeypatch.undo()

    def log_disk_full(*args, **kw):
        raise OSError(28, "No space left on device", str(out / "log.jsonl"))

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", log_disk_full)
    reset_accelerate_state()
    assert main(["--config", str(path), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback" not in err
        and f"error: {out / 'log.jsonl'} could not be written: the disk holding {out} is "
        "full (No space left on device); free space there, then continue with --resume auto"
        in err
    )


def test_an_output_dir_that_is_a_file_is_named(tiny_model, data, tmp_path, capsys):
    from training.sft.trainer import main

    (tmp_path / "runs").write_text("not a folder")
    under = f"is under {tmp_path / 'runs'}, which is a file"
    for out, what in ((tmp_path / "runs", "is a file"), (tmp_path / "runs" / "a", under)):
        with pytest.raises(ConfigError, match="output_dir"):
            config_from_dict(make_config(tiny_model, data, out))
        path = write_config(tmp_path / "sft.json", make_config(tiny_model, data, out))
        assert main(["--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"error: output_dir {out} {what}, not a folder: give a folder path (a new one is created)" in err
    assert (tmp_path / "runs").read_text() == "not a folder"


def test_a_run_killed_before_its_first_checkpoint_restarts_with_a_fresh_log(tiny_model, data, tmp_path, monkeypatch):
    out = tmp_path / "early"
    cfg = make_config(tiny_model, data, out, stages=[make_config(tiny_model, data, out)["stages"][0]])

    def killed(*args, **kw):
        raise KeyboardInterrupt  # the process dies at its first save, with steps 1 and 2 logged

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg)
    assert [r["step"] for r in train_records(out)] == [1, 2]
    assert ckpt_mod.find_checkpoint("auto", out) is None
    monkeypatch.undo()
    reset_accelerate_state()
    assert run_sft(cfg, resume="auto").global_step == 2  # no checkpoint: a fresh start
    assert [r["step"] for r in train_records(out)] == [1, 2]  # each step logged once


# 5. -------------------------------------------------------------------------------------------------


def test_an_instruction_longer_than_the_text_encoder_takes_stops_the_run_naming_its_row(tiny_model, data, tmp_path):
    """The encoding pass refuses it with its row and token count (not an index error deep in the text encoder)
    before any step trains."""
    rows = [json.loads(x) for x in Path(data["train"]).read_text().splitlines()]
    base = Path(data["train"]).parent
    long = {
        **rows[0],
        "references": [str(base / r) for r in rows[0]["references"]],
        "target": str(base / rows[0]["target"]),
        "instruction": "Recolour the circle to blue. " * 800,  # ~5,600 tokens; the tiny encoder has 4,096 positions
    }
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps(long) + "\n")
    cfg = make_config(tiny_model, {"train": str(manifest), "val": str(manifest)}, tmp_path / "out")
    with pytest.raises(UniRefError, match=r"manifest.jsonl:1: instruction is too long: .* 4096 positions"):
        run_sft(cfg)
    assert not list((tmp_path / "out").glob("checkpoint*"))


def test_bad_rows_are_reported_and_skipped(tiny_model, data, tmp_path):
    base = Path(data["train"]).parent
    rows = [json.loads(x) for x in Path(data["train"]).read_text().splitlines()]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    good = {
        **rows[0],
        "references": [str(base / r) for r in rows[0]["references"]],
        "target": str(base / rows[0]["target"]),
    }
    lines = [
        json.dumps(good),
        json.dumps({**good, "references": [str(bad / "missing.png")]}),
        json.dumps({**good, "target": str(bad / "corrupt.png")}),
        json.dumps({**good, "instruction": "   "}),
        "{not json",
        json.dumps({**good, "references": []}),
        json.dumps({**good, "instruction": "Recolour the circle \udc80 to blue"}),  # a byte that was not UTF-8
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = config_from_dict(make_config(tiny_model, {"train": str(manifest), "val": str(manifest)}, tmp_path / "o"))
    kept, report = load_rows([str(manifest)], cfg)
    assert len(kept) == 1 and report.total == 7 and report.usable == 1
    reasons = dict(report.skipped)
    assert "instruction is not valid UTF-8" in reasons["manifest.jsonl:7"]
    assert "file not found" in reasons["manifest.jsonl:2"] and "reference 1" in reasons["manifest.jsonl:2"]
    assert "could not be read as an image" in reasons["manifest.jsonl:3"]
    assert reasons["manifest.jsonl:4"] == "empty instruction"
    assert "not valid JSON" in reasons["manifest.jsonl:5"]
    assert "no references" in reasons["manifest.jsonl:6"]
    assert "7 rows, 1 usable, 6 skipped" in report.summary()

    # A target smaller than a stage's output size would be upscaled: skipped, the stage named.
    big = config_from_dict(
        make_config(
            tiny_model,
            data,
            tmp_path / "o",
            stages=[{"budget": 64, "steps": 1, "lr": 1e-3, "batch_size": 1, "output_size": 128}],
        )
    )
    kept, report = load_rows([str(manifest)], big)
    assert not kept and "smaller than stage 1's output 128×128" in dict(report.skipped)["manifest.jsonl:1"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lerning_rate": 1e-4}, "unknown config key 'lerning_rate' in the config"),
        (
            {"stages": [{"budget": 64, "steps": 1, "lr": 1e-3, "batch_size": 1, "out_size": 64}]},
            "unknown config key 'out_size' in stages[0] (stage 1): did you mean 'output_size'",
        ),
        ({"stages": []}, "stages is empty"),
        (
            {
                "stages": [
                    {"budget": 64, "steps": 1, "lr": 1e-3, "batch_size": 1},
                    {"budget": 0, "steps": 1, "lr": 1e-3, "batch_size": 1},
                ]
            },
            "stages[1] (stage 2): budget is 0",
        ),
        ({"stages": [{"budget": 64, "steps": 0, "lr": 1e-3, "batch_size": 1}]}, "stages[0] (stage 1): steps is 0"),
        (
            {"stages": [{"budget": 64, "steps": 1, "lr": 1e-3, "batch_size": 0}]},
            "stages[0] (stage 1): batch_size is 0",
        ),
        ({"lora": {"rank": 4, "alpha": 4, "rnak": 2}}, "unknown config key 'rnak' in lora"),
        ({"mixed_precision": "fp8"}, "mixed_precision is 'fp8'"),
        ({"micro_batch_size": 3}, "stages[0] (stage 1): batch_size 2 is not a multiple of micro_batch_size 3"),
        ({"logit_normal": {"mean": 0, "std": 1, "pure_noise": 1.0}}, "logit_normal.pure_noise is 1.0: give a share"),
        ({"seed": 2**64}, "the config: seed is 18446744073709551616: it must be at most 4294967295"),
        ({"seed": 2**32}, "the config: seed is 4294967296: it must be at most 4294967295 (numpy's generators"),
        ({"seed": -1}, "the config: seed is -1: it must be at least 0"),
    ],
)
def test_config_errors_name_the_key_and_stage(tiny_model, data, tmp_path, change, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(make_config(tiny_model, data, tmp_path, **change))
    assert message in str(e.value)


def test_pure_noise_share_puts_that_share_of_draws_at_sigma_one():
    """The sampler's first step is at σ = 1; ``pure_noise`` trains there, the plain logit-normal never does."""
    from training.sft.config import LogitNormal
    from training.sft.loss import draw_noise_and_sigma

    slots = list(range(400))
    _, plain = draw_noise_and_sigma(0, 0, slots, (4, 64), LogitNormal(0.5, 1.0))
    noise_mixed, mixed = draw_noise_and_sigma(0, 0, slots, (4, 64), LogitNormal(0.5, 1.0, pure_noise=0.25))
    assert not (plain == 1).any() and 0 < plain.min() and plain.max() < 1
    share = float((mixed == 1).float().mean())
    assert 0.19 < share < 0.31, share
    rest = mixed[mixed < 1]
    assert 0.5 < float(rest.median()) < 0.75  # the others stay logit-normal(0.5, 1): median sigmoid(0.5) = 0.62
    # Per-slot draws stay independent of the process layout: slot 7 alone draws what it drew among 400.
    n7, s7 = draw_noise_and_sigma(0, 0, [7], (4, 64), LogitNormal(0.5, 1.0, pure_noise=0.25))
    assert torch.equal(n7[0], noise_mixed[7]) and torch.equal(s7[0], mixed[7])


def test_ema_warms_up_so_an_early_average_follows_the_live_weights():
    """With a fixed 0.998 the EMA would still be 55 % random start after 300 steps (early grids: noise)."""
    from training.common.trainable import EMA

    params = {"w": torch.nn.Parameter(torch.zeros(3))}
    ema = EMA(params, 0.998)
    with torch.no_grad():
        params["w"].fill_(1.0)  # the live weights moved away from the start and stay there
    for step in range(1, 301):
        ema.update(params, step)
    assert float(ema.shadow["w"].min()) > 0.95
    assert ema.decay_at(1) < 0.2 and ema.decay_at(100_000) == 0.998  # full decay once warmed up


def test_config_file_json_and_toml(tiny_model, data, tmp_path):
    cfg = make_config(tiny_model, data, tmp_path)
    assert load_config(write_config(tmp_path / "c.json", cfg)).stages[1].budget == 96 * 96
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'model = "{tiny_model}"\ntrain_manifest = "{data["train"]}"\n'
        '[[stages]]\nbudget = "1536x1024"\nsteps = 5\nlr = 1e-4\nbatch_size = 4\n'
    )
    loaded = load_config(toml)
    assert loaded.stages[0].budget == 1536 * 1024 and loaded.lora is None and loaded.mixed_precision == "no"
    shipped = load_config(ROOT / "training" / "configs" / "tiny_shapecompose.json")
    assert [s.budget for s in shipped.stages] == [128 * 128, 192 * 192, 256 * 256]


def test_resume_refuses_another_config_or_model(smoke_run, tmp_path):
    from uniref_core.tiny import make_tiny_model

    cfg, _ = smoke_run
    changed = json.loads(json.dumps(cfg))
    changed["stages"][0]["lr"] = 2e-3
    with pytest.raises(ckpt_mod.CheckpointError, match=r"its config differs in stages\[0\]\.lr: 0\.001 → 0\.002"):
        run_sft(changed, resume="auto")
    other = make_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(ckpt_mod.CheckpointError, match="trained from another model"):
        run_sft({**cfg, "model": str(other)}, resume="auto")
    with pytest.raises(ckpt_mod.CheckpointError, match="no checkpoint there"):
        run_sft(cfg, resume=str(tmp_path / "nowhere"))


# 6. -------------------------------------------------------------------------------------------------


def test_micro_batches_never_mix_layouts_and_resume_replays_them():
    keys = [("a",)] * 5 + [("b",)] * 2 + [("c",)]
    sampler = BucketSampler(keys, batch_size=4, micro_batch_size=2, seed=7, stage_index=1)
    assert sampler.micro_per_epoch == 3 + 1 + 1  # ceil(5/2) + ceil(2/2) + ceil(1/2): proportional to size
    seen = [sampler.batch(s) for s in range(40)]
    assert all(len(b) == 2 and all(len(m) == 2 and len({keys[i] for i in m}) == 1 for m in b) for b in seen)
    again = BucketSampler(keys, batch_size=4, micro_batch_size=2, seed=7, stage_index=1)
    assert [again.batch(s) for s in (39, 3, 17)] == [seen[39], seen[3], seen[17]]  # any step, in any order
    stream = [m for b in seen for m in b]
    assert set(i for m in stream[:5] for i in m) == set(range(8))  # every sample in each epoch (5 micro-batches)
    other = BucketSampler(keys, batch_size=4, micro_batch_size=2, seed=8, stage_index=1)
    assert [other.batch(s) for s in range(10)] != seen[:10]
    # Micro-batches of one: any layouts side by side in a global batch, nothing repeated.
    singles = BucketSampler(keys, batch_size=4, micro_batch_size=1, seed=7, stage_index=0)
    assert sorted(i for s in (0, 1) for m in singles.batch(s) for i in m) == list(range(8))
    # Sharding: two processes take the two halves; slots number the global batch, whatever the split.
    assert shard(seen[0], 0, 2) + shard(seen[0], 1, 2) == shard(seen[0], 0, 1)
    assert [slot for m in shard(seen[0], 0, 1) for slot, _ in m] == [0, 1, 2, 3]


def test_padded_text_batch_equals_one_sample_forwards(tiny_model, data):
    from uniref_core import UniRefPipeline
    from uniref_core.pipeline import predict_velocity

    pipe = UniRefPipeline.from_pretrained(tiny_model)
    cfg = config_from_dict(make_config(tiny_model, data, "/tmp/unused"))
    rows, _ = load_rows([data["train"]], cfg)
    stage = cfg.stages[0]
    by_layout = {}
    for i, row in enumerate(rows):
        by_layout.setdefault(layout_key(plan_row(row, stage, cfg)), []).append(i)
    enc = SampleEncoder(pipe.c, cfg)
    group = next(g for g in by_layout.values() if len({rows[i].instruction for i in g}) > 1)[:3]
    encoded = [enc.latents(rows[i], stage) for i in group]
    prompts = [enc.prompt(rows[i], e.plan) for i, e in zip(group, encoded)]
    assert len({p.embeds.shape[1] for p in prompts}) > 1  # the prompts really are padded
    batch = collate(encoded, prompts, "cpu", torch.float32)
    assert batch.mask is not None and batch.mask.shape == batch.embeds.shape[:2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch.x0.shape, generator=g)
    t = torch.tensor([900.0, 500.0, 100.0])[: len(group)]
    tr = pipe.c.transformer
    with torch.no_grad():
        together = predict_velocity(tr, x, t, batch.refs, batch.embeds, batch.mask, batch.img_shapes)
        for j, (e, p) in enumerate(zip(encoded, prompts)):
            alone = predict_velocity(tr, x[j : j + 1], t[j : j + 1], e.refs, p.embeds, None, [e.img_shapes])
            torch.testing.assert_close(together[j : j + 1], alone, rtol=1e-5, atol=1e-5)
    other = next(
        i
        for g2 in by_layout.values()
        for i in g2
        if i not in group and layout_key(plan_row(rows[i], stage, cfg)) != layout_key(encoded[0].plan)
    )
    with pytest.raises(ValueError, match="mixes layouts"):
        e2 = enc.latents(rows[other], stage)
        collate([encoded[0], e2], [prompts[0], enc.prompt(rows[other], e2.plan)], "cpu", torch.float32)


def test_training_encodes_samples_exactly_as_inference(tiny_model, data):
    from uniref_core import UniRefPipeline

    pipe = UniRefPipeline.from_pretrained(tiny_model)
    cfg = config_from_dict(make_config(tiny_model, data, "/tmp/unused"))
    rows, _ = load_rows([data["train"]], cfg)
    row = next(r for r in rows if r.k == 2)
    stage = cfg.stages[1]
    enc = SampleEncoder(pipe.c, cfg)
    encoded = enc.latents(row, stage)
    prompt = enc.prompt(row, encoded.plan)
    cond = pipe.encode(
        [str(p) for p in row.references],
        row.instruction,
        cfg=1.0,
        mode="budget",
        budget=stage.budget,
        vl_budget=cfg.vl_budget,
        width=64,
        height=64,
    )
    assert cond.plan.img_shapes == encoded.img_shapes
    assert torch.equal(cond.positive.embeds, prompt.embeds)
    for a, b in zip(cond.ref_tokens, encoded.refs):
        assert torch.equal(a, b)
