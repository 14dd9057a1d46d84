"""Training at real size (issue 34): the frozen base in the dtype it runs in, the encoding pass and its disk cache,
the encoders gone before the transformer loads, RL re-scoring in micro-batches. Tiny models, 64² ShapeCompose."""

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from tests.sgd import assert_same_updates, start_weights, use_sgd
from tests.training_runs import TRUSTED, make_config, reset_accelerate_state, rl_config, run_sft
from training.common.config import ConfigError
from training.sft.config import config_from_dict
from uniref_core.fp8 import FP8Linear

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def lora_config(model, data, out, **over) -> dict:
    cfg = make_config(
        model,
        data,
        out,
        lora={"rank": 4, "alpha": 4},
        mixed_precision="bf16",
        stages=[{"budget": 64, "steps": 2, "lr": 1e-3, "batch_size": 2, "output_size": 64}],
    )
    cfg.update(over)
    return cfg


# -- the frozen base ------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_lora_trains_fp32_adapters_on_a_frozen_base_in_its_own_dtype(tiny_model, data, tmp_path, base):
    """bf16: every frozen weight is bf16; fp8: the block linears hold 8-bit weights (a quarter of fp32) and the rest
    is bf16. Either way only the LoRA factors train, in fp32, under peft's names, so checkpoints and the ComfyUI
    export are the same files as from an fp32 base."""
    from training.common.model import load_transformer
    from training.common.trainable import named_trainable, setup_transformer

    cfg = config_from_dict(lora_config(tiny_model, data, tmp_path / "x", base_dtype=base))
    transformer = load_transformer(cfg, "cpu")
    setup_transformer(transformer, cfg.lora, gradient_checkpointing=True)
    trainable = named_trainable(transformer)
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for n, p in transformer.named_parameters() if n not in trainable]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    fp8 = [m for m in transformer.modules() if isinstance(m, FP8Linear)]
    if base == "fp8":
        assert fp8 and all(m.weight_fp8.dtype == torch.uint8 for m in fp8)
        assert not any(
            isinstance(m, torch.nn.Linear)
            for n, m in transformer.named_modules()
            if n.startswith("transformer_blocks.") and "lora_" not in n
        )
    else:
        assert not fp8

    # The same adapter names as on a peft-wrapped fp32 base.
    fp32 = config_from_dict(lora_config(tiny_model, data, tmp_path / "y", mixed_precision="no"))
    reference = load_transformer(fp32, "cpu")
    setup_transformer(reference, fp32.lora, gradient_checkpointing=False)
    assert sorted(trainable) == sorted(named_trainable(reference))


def test_fp8_base_lora_run_exports_a_comfyui_lora_like_a_bf16_base(tiny_model, data, tmp_path):
    """A LoRA trained on an 8-bit base exports the same ComfyUI key set as one trained on bf16, its first-step loss
    is the bf16 base's within fp8 rounding, and switching the adapters off gives the base model back."""
    from training.common import checkpoint as ckpt_mod
    from training.common.trainable import adapters_disabled
    from training.export import export

    runs = {}
    for base in ("bf16", "fp8"):
        out = tmp_path / base
        runs[base] = run_sft(lora_config(tiny_model, data, out, base_dtype=base))
        reset_accelerate_state()
    assert runs["fp8"].losses[0] == pytest.approx(runs["bf16"].losses[0], rel=0.05)
    files = {
        b: export(ckpt_mod.complete_checkpoints(tmp_path / b)[-1], tmp_path / f"{b}.safetensors", lora_only=True)
        for b in runs
    }
    from safetensors.torch import load_file

    keys = {b: set(load_file(f)) for b, f in files.items()}
    assert keys["fp8"] == keys["bf16"] and any(k.endswith(".lora_B.weight") for k in keys["fp8"])

    from training.common.model import load_transformer
    from training.common.trainable import load_trainable_state_dict, setup_transformer

    cfg = config_from_dict(lora_config(tiny_model, data, tmp_path / "z", base_dtype="fp8"))
    model = load_transformer(cfg, "cpu")
    setup_transformer(model, cfg.lora, False)
    load_trainable_state_dict(
        model, ckpt_mod.load_tensors(ckpt_mod.complete_checkpoints(tmp_path / "fp8")[-1], ckpt_mod.TRAINABLE_FILE)
    )
    layer = model.transformer_blocks[0].attn.to_q
    x = torch.randn(1, 16, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with adapters_disabled(model):
            off = layer(x)
        on = layer(x)
        untouched = load_transformer(cfg, "cpu").transformer_blocks[0].attn.to_q(x)
    assert not torch.allclose(on, off)  # the trained adapter changes the layer…
    torch.testing.assert_close(off, untouched, rtol=0, atol=0)  # …and off, it is the 8-bit base as loaded


@pytest.mark.parametrize(
    "over, message",
    [
        ({"base_dtype": "bf16", "mixed_precision": "no"}, "base_dtype bf16 runs the frozen model in bf16"),
        ({"base_dtype": "fp8", "lora": None}, "base_dtype fp8 is for LoRA training"),
        ({"base_dtype": "int4"}, "base_dtype is 'int4': use one of auto, fp32, bf16, fp8"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing is 'yes'"),
    ],
)
def test_precision_settings_that_cannot_train_are_named(tiny_model, data, tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(lora_config(tiny_model, data, tmp_path, **over))


def test_checkpointing_defaults_on_only_above_a_billion_parameters(tiny_model, data, tmp_path, monkeypatch):
    from training.common import model as model_mod

    cfg = config_from_dict(lora_config(tiny_model, data, tmp_path))
    assert cfg.gradient_checkpointing is None and not model_mod.use_checkpointing(cfg)
    monkeypatch.setattr(model_mod, "transformer_parameters", lambda model: 20_400_000_000)
    assert model_mod.use_checkpointing(cfg)
    assert not model_mod.use_checkpointing(
        config_from_dict(lora_config(tiny_model, data, tmp_path, gradient_checkpointing=False))
    )


# -- the encoding pass ----------------------------------------------------------------------------------


def _alive(cls) -> int:
    gc.collect()
    return sum(isinstance(o, cls) for o in gc.get_objects())


def test_text_encoder_is_gone_before_the_transformer_loads(tiny_model, data, tmp_path, monkeypatch):
    """The encoders never sit beside the transformer: when it loads, no text encoder is alive in the process."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    import training.sft.trainer as trainer

    seen = []
    real = trainer.load_transformer

    def spy(cfg, device):
        seen.append(_alive(Qwen2_5_VLForConditionalGeneration))
        return real(cfg, device)

    monkeypatch.setattr(trainer, "load_transformer", spy)
    gc.collect()
    before = _alive(Qwen2_5_VLForConditionalGeneration)
    run_sft(lora_config(tiny_model, data, tmp_path / "run"))
    assert seen == [before]


def test_cache_is_reused_by_a_later_run_and_never_across_models(
    tiny_model, tiny_model_2511, data, tmp_path, monkeypatch
):
    """A second run on the same model, data and sizes reads every encoding from the shared cache (the encoders are
    not even loaded) and trains exactly as the first; a changed stage re-encodes only that stage; another model's
    encoders get their own folder."""
    import training.sft.trainer as trainer

    cache = tmp_path / "cache"
    first = run_sft(lora_config(tiny_model, data, tmp_path / "a", cache_dir=str(cache), eval_samples=0))
    folders = sorted(p.name for p in cache.iterdir())
    assert [f.split("-")[0] for f in folders] == ["prompts", "stage1"]
    assert all((cache / f / "cache.json").is_file() for f in folders)

    def no_encoders(cfg, device):
        raise AssertionError("the encoders were loaded although every row is in the cache")

    monkeypatch.setattr(trainer, "load_encoders", no_encoders)
    again = run_sft(lora_config(tiny_model, data, tmp_path / "b", cache_dir=str(cache), eval_samples=0))
    assert again.losses == first.losses
    monkeypatch.undo()

    stages = [{"budget": 96, "steps": 1, "lr": 1e-3, "batch_size": 2, "output_size": 64}]
    run_sft(lora_config(tiny_model, data, tmp_path / "c", cache_dir=str(cache), eval_samples=0, stages=stages))
    after = sorted(p.name for p in cache.iterdir())
    assert set(folders) <= set(after) and len(after) == 3  # one new stage folder, the prompts reused

    # 2511 differs from 2509 in its transformer only: the same encoders, so the same encodings are reused.
    run_sft(lora_config(tiny_model_2511, data, tmp_path / "d", cache_dir=str(cache), eval_samples=0))
    assert len(list(cache.iterdir())) == 3
    from uniref_core.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=1)  # other text encoder and VAE weights
    run_sft(lora_config(other, data, tmp_path / "e", cache_dir=str(cache), eval_samples=0))
    assert len(list(cache.iterdir())) == 5  # its own prompts and stage folders


def test_an_interrupted_encoding_pass_keeps_whole_shards_and_the_next_run_encodes_the_rest(
    tiny_model, data, tmp_path, monkeypatch
):
    from training.common import cache as cache_mod
    from training.sft import data as data_mod

    monkeypatch.setattr(cache_mod, "SHARD_ROWS", 3)
    calls = []
    real = data_mod.SampleEncoder.prompt

    def crash_on_the_fifth(self, row, plan):
        calls.append(row.where)
        if len(calls) == 5:
            raise RuntimeError("power cut")
        return real(self, row, plan)

    monkeypatch.setattr(data_mod.SampleEncoder, "prompt", crash_on_the_fifth)
    cfg = lora_config(tiny_model, data, tmp_path / "run", eval_samples=0)
    with pytest.raises(RuntimeError, match="power cut"):
        run_sft(cfg)
    folder = next((tmp_path / "run" / "cache").glob("prompts-*"))
    assert [p.name for p in folder.iterdir()] == ["shard_00000.safetensors"]  # whole shards only, not complete
    calls.clear()
    monkeypatch.setattr(data_mod.SampleEncoder, "prompt", real)
    encoded = []
    monkeypatch.setattr(
        data_mod.SampleEncoder, "prompt", lambda self, row, plan: encoded.append(1) or real(self, row, plan)
    )
    run_sft(cfg)
    rows = sum(1 for _ in open(data["train"]))
    assert len(encoded) == rows - 3  # the first shard's 3 rows were not encoded again
    assert (folder / "cache.json").is_file()


# -- RL --------------------------------------------------------------------------------------------------


def test_policy_micro_batches_give_the_update_of_one_batch(tiny_model, prompts, tmp_path, monkeypatch):
    """Re-scoring one image at a time (gradients accumulated) trains as re-scoring the whole group at once: with
    plain SGD the weight updates, i.e. the summed gradients, agree."""
    from training.common import checkpoint as ckpt_mod
    from training.rl.config import config_from_dict as rl_from_dict
    from training.rl.trainer import run

    use_sgd(monkeypatch)
    weights = {}
    for name, micro in (("whole", None), ("one", 1)):
        cfg = rl_config(tiny_model, prompts, tmp_path / name, grid_every=0, lr=1.0, steps=1, policy_micro_batch=micro)
        res = run(rl_from_dict(cfg), trusted_modules=TRUSTED)
        assert res.records[0]["items"] == 12
        weights[name] = ckpt_mod.load_tensors(
            ckpt_mod.complete_checkpoints(tmp_path / name)[-1], ckpt_mod.TRAINABLE_FILE
        )
        reset_accelerate_state()
    assert_same_updates(start_weights(tiny_model), weights["whole"], weights["one"])


def test_rl_prompts_are_encoded_once_into_the_cache(tiny_model, prompts, tmp_path):
    from training.rl.config import config_from_dict as rl_from_dict
    from training.rl.trainer import run

    run(rl_from_dict(rl_config(tiny_model, prompts, tmp_path / "r", grid_every=0, steps=1)), trusted_modules=TRUSTED)
    folder = next((tmp_path / "r" / "cache").glob("rl-prompts-*"))
    key = json.loads((folder / "cache.json").read_text())
    assert key["kind"] == "rl-prompts" and key["budget"] == 64 * 64  # areas: 64 means 64²


def test_fp8_base_on_a_torch_without_float8_says_what_to_use(monkeypatch):
    from training.common.model import check_fp8
    from uniref_core.errors import UniRefError

    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(UniRefError, match="base_dtype fp8 needs torch ≥ 2.1.*use base_dtype bf16"):
        check_fp8("cpu")


def test_the_cpu_encoding_pass_reuses_its_freed_memory_instead_of_faulting_it_in_again():
    """Under `heap_kept` (the trainers' CPU encoding pass) the built-in model's VAE encodes 256² scenes with a small
    fraction of the page faults of a plain process (each fault is kernel time; bench/bench_encoding_pass.py has the
    CPU seconds)."""
    from bench.bench_encoding_pass import measure

    plain, kept = measure("plain", 256, 3), measure("kept", 256, 3)
    assert kept["faults"] * 4 < plain["faults"], (plain, kept)


def test_heap_kept_gives_the_memory_back_when_the_pass_ends():
    """After the pass the thresholds are glibc's again and `free` trims: a large block freed afterwards leaves the
    process, so the encoding pass's heap does not stay resident through training."""
    import subprocess
    import sys

    child = (
        "import torch\n"
        "from training.common.model import free, heap_kept\n"
        "rss = lambda: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')))\n"
        "with heap_kept('cpu'):\n"
        "    x = torch.ones(64 * 2**20 // 4); del x\n"
        "inside = rss(); free('cpu'); after_free = rss()\n"
        "y = torch.ones(64 * 2**20 // 4); del y\n"
        "print(inside - after_free, rss() - after_free)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", child], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    trimmed_kib, kept_after_kib = map(int, out.stdout.split())
    assert trimmed_kib > 48 * 1024  # the pass's freed 64 MiB left the process at free()
    assert kept_after_kib < 8 * 1024  # and a block freed after the pass is returned at once
