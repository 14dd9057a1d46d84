"""The memory planner (training/memory.py): what `python -m training.memory` tells a user before any weight loads,
checked against a measured run on the CPU and against the real-size targets of issue 34."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.common.config import ConfigError
from training.memory import GiB, check_fit, load_any_config, main, plan, write_config_only_model

ROOT = Path(__file__).resolve().parents[1]

# A model in the real proportions (uniref_core.tiny.REAL_PROPORTIONS) at half its width and 3 blocks: ~30 M
# transformer parameters with the real head width, the text stack ~0.4 of it.
SMALL_PROPORTIONS = dict(
    transformer=dict(
        num_layers=3,
        attention_head_dim=128,
        num_attention_heads=4,
        joint_attention_dim=512,
        axes_dims_rope=(16, 56, 56),
    ),
    text=dict(
        hidden_size=512,
        intermediate_size=3072,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_window_layers=2,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    ),
    dtype="bf16",
)


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """A config-only folder of the real Qwen-Image-Edit (20.4 B transformer, Qwen2.5-VL-7B, the real VAE)."""
    return write_config_only_model(tmp_path_factory.mktemp("real") / "model")


def write_config(folder: Path, model, size=1024, rank=64, base="bf16", kind="sft", refs=3, **extra) -> Path:
    manifest = folder / "manifest.jsonl"
    manifest.write_text(
        json.dumps({"references": [f"r{k}.png" for k in range(refs)], "instruction": "x", "target": "t.png"}) + "\n"
    )
    data = {
        "model": str(model),
        "train_manifest": str(manifest),
        "mixed_precision": "bf16",
        "base_dtype": base,
        "lora": None if rank is None else {"rank": rank, "alpha": rank},
        "gradient_checkpointing": True,
    }
    if kind == "sft":
        data["stages"] = [{"budget": size, "steps": 100, "lr": 1e-4, "batch_size": 1, "output_size": size}]
    else:
        data.update(group_size=16, budget=size, output_size=size)
    data.update(extra)
    path = folder / f"{kind}_{size}_{rank}_{base}.json"
    path.write_text(json.dumps(data))
    return path


def peak_gib(path, processes=1) -> float:
    cfg, kind = load_any_config(path)
    return plan(cfg, kind, processes, "cuda").peak / GiB


# --------------------------------------------------------------------------------------------------
# Real size (issue 34's targets)
# --------------------------------------------------------------------------------------------------


def test_real_size_lora_1024_with_3_references(real_model, tmp_path):
    """LoRA r64 at 1024² with 3 references: ~50 GiB on a bf16 base and ~32 GiB on fp8, each a little over the
    issue's 48 / 30 GiB targets; at rank 32 both fit them."""
    bf16 = peak_gib(write_config(tmp_path, real_model, base="bf16"))
    fp8 = peak_gib(write_config(tmp_path, real_model, base="fp8"))
    assert 46 < bf16 < 54 and 28 < fp8 < 34
    assert peak_gib(write_config(tmp_path, real_model, rank=32, base="bf16")) <= 48
    assert peak_gib(write_config(tmp_path, real_model, rank=32, base="fp8")) <= 30
    assert peak_gib(write_config(tmp_path, real_model, rank=16, base="fp8")) < fp8


def test_real_size_msgrpo_g16_at_512_fits_80(real_model, tmp_path):
    whole = peak_gib(write_config(tmp_path, real_model, size=512, kind="msgrpo", policy_micro_batch=None))
    assert whole <= 80
    # Re-scoring 4 images at a time (the default) instead of the whole group takes most of the activations away.
    assert peak_gib(write_config(tmp_path, real_model, size=512, kind="msgrpo")) < whole - 15


def test_real_size_full_fine_tune_needs_fsdp_over_8_gpus(real_model, tmp_path):
    path = write_config(tmp_path, real_model, rank=None)
    assert peak_gib(path) > 300  # fp32 weights, gradients and AdamW's two states: 16 bytes × 20.4 B
    assert peak_gib(path, processes=8) > 300  # data parallel without "fsdp": every process holds all of it
    assert peak_gib(write_config(tmp_path, real_model, rank=None, fsdp=True), processes=8) <= 70


def test_the_encoding_pass_holds_the_text_encoder_only_before_the_transformer(real_model, tmp_path):
    cfg, kind = load_any_config(write_config(tmp_path, real_model))
    est = plan(cfg, kind)
    parts = {p.name: p for p in est.parts}
    assert parts["text encoder"].phase == "encoding" and 15 < parts["text encoder"].bytes / GiB < 16
    assert 37 < parts["transformer"].bytes / GiB < 39 and parts["transformer"].phase == "training"
    assert est.layout.tokens == pytest.approx(8600, rel=0.05)  # DESIGN §5: ~8.6k tokens at 1024² with 3 references


# --------------------------------------------------------------------------------------------------
# What a user sees
# --------------------------------------------------------------------------------------------------


def test_cli_prints_every_part_and_fits(real_model, tmp_path, capsys):
    path = write_config(tmp_path, real_model, size=512, rank=16, base="fp8")
    assert main(["--config", str(path), "--gpu-gb", "24"]) == 0
    out = capsys.readouterr().out
    for line in ("text encoder ", "transformer ", "LoRA r16 weights", "AdamW states", "activations"):
        assert line in out
    assert "fp8" in out and "GPU" in out and "total per GPU:" in out
    assert out.rstrip().endswith("fits")


def test_cli_names_the_settings_that_would_fit(real_model, tmp_path, capsys):
    path = write_config(tmp_path, real_model, size=1024, rank=64, base="bf16")
    main(["--config", str(path), "--gpu-gb", "48"])
    out = capsys.readouterr().out
    assert "does not fit" in out
    assert 'base_dtype "fp8"' in out and "lora rank 32" in out


def test_cli_full_fine_tune_on_one_gpu_suggests_fsdp(real_model, tmp_path, capsys):
    main(["--config", str(write_config(tmp_path, real_model, rank=None)), "--gpu-gb", "80"])
    assert '"fsdp": true over 8 processes (torchrun --nproc_per_node 8)' in capsys.readouterr().out


def test_check_fit_raises_before_loading_naming_the_fix(real_model, tmp_path):
    cfg, kind = load_any_config(write_config(tmp_path, real_model, base="bf16"))
    check_fit(cfg, kind, 1, 80 * GiB)  # fits: no error
    with pytest.raises(ConfigError, match=r'base_dtype "fp8".*lora rank 32') as e:
        check_fit(cfg, kind, 1, 48 * GiB)
    assert "48.0 GiB" in str(e.value) and "UNIREF_NO_FIT_CHECK=1" in str(e.value)
    cfg, kind = load_any_config(write_config(tmp_path, real_model, base="bf16", gradient_checkpointing=False))
    with pytest.raises(ConfigError, match="gradient_checkpointing true"):
        check_fit(cfg, kind, 1, 48 * GiB)


def test_check_fit_can_be_overridden_by_a_user_who_wants_to_try(real_model, tmp_path, monkeypatch):
    cfg, kind = load_any_config(write_config(tmp_path, real_model, base="bf16"))
    monkeypatch.setenv("UNIREF_NO_FIT_CHECK", "1")
    check_fit(cfg, kind, 1, 48 * GiB)  # the planner says no, the user tries anyway


def test_check_fit_says_when_nothing_fits(real_model, tmp_path):
    cfg, kind = load_any_config(write_config(tmp_path, real_model, base="fp8", rank=8))
    with pytest.raises(ConfigError, match="no setting of these trainers does"):
        check_fit(cfg, kind, 1, 12 * GiB)


def test_a_model_folder_without_configs_is_named(tmp_path):
    path = write_config(tmp_path, tmp_path / "nowhere")
    cfg, kind = load_any_config(path)
    with pytest.raises(ConfigError, match="nowhere.*config.json"):
        plan(cfg, kind)


# --------------------------------------------------------------------------------------------------
# Against a measured run
# --------------------------------------------------------------------------------------------------


def test_prediction_within_15_percent_of_a_measured_lora_run(tmp_path):
    """A LoRA r64 SFT run on a bf16 base with checkpointing, in a fresh process, measured as the bench measures it:
    the planner's CPU prediction is within 15 % of its peak resident memory (library code aside, which depends on
    the CPU: this test failed on one machine type at 258 vs 338 MiB while code pages were counted)."""
    from training.memory import predict_peak
    from training.tasks.shapecompose.scenes import make_split, write_manifest
    from uniref_core.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "model", **SMALL_PROPORTIONS)
    manifest = write_manifest(make_split("train", 2, size=256, ks=(3,), kinds=("compose",)), tmp_path / "data")
    config = {
        "model": str(model),
        "train_manifest": str(manifest),
        "output_dir": str(tmp_path / "run"),
        "stages": [{"budget": 256, "steps": 2, "lr": 1e-4, "batch_size": 1, "output_size": 256}],
        "vl_budget": 112,
        "eval_samples": 0,
        "tensorboard": False,
        "mixed_precision": "bf16",
        "base_dtype": "bf16",
        "gradient_checkpointing": True,
        "save_every": 0,
        "lora": {"rank": 64, "alpha": 64},
    }
    path = tmp_path / "lora.json"
    path.write_text(json.dumps(config))
    from bench.bench_train_memory import CHILD, CHILD_ENV  # measured exactly as the bench measures

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **CHILD_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(child), "sft", str(path), "cpu"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_kib, code_kib = next(line.split()[2:4] for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB"))
    measured = int(peak_kib) * 1024
    predicted = predict_peak(path, kind="sft", processes=1, device="cpu")
    assert predicted == pytest.approx(measured, rel=0.15), (
        f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB "
        f"(+ {int(code_kib) / 2**10:.0f} MiB of library code, not counted)"
    )
