"""MSGRPO on tiny models and 64² ShapeCompose prompts: the loss maths, advantages, reward plug-ins, runs."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training_runs import TRUSTED, finish, launch, reset_accelerate_state, rl_config, torchrun
from training.common.config import ConfigError
from training.rewards import RewardBatch, RewardError, Signal, check_batch, load_source
from training.rl.advantages import group_advantages, normalise
from training.rl.config import config_from_dict
from training.rl.loss import clipped_policy_loss

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# -- the objective ----------------------------------------------------------------------------------


def test_ratio_one_gives_the_plain_policy_gradient():
    """With the new policy equal to the old, the clipped loss is −mean(A·r) and its gradient −mean(A·∇log π)."""
    torch.manual_seed(0)
    theta = torch.randn(5, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.0])
    log_prob = torch.tanh(theta) * 0.3
    loss, stats = clipped_policy_loss(log_prob, log_prob.detach(), adv, clip_range=1e-4)
    assert stats["ratio_dev"] == 0.0 and stats["clip_frac"] == 0.0
    (grad,) = torch.autograd.grad(loss, theta)
    theta2 = theta.detach().clone().requires_grad_(True)
    (pg,) = torch.autograd.grad(-(adv * torch.tanh(theta2) * 0.3).mean(), theta2)
    torch.testing.assert_close(grad, pg)


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    new = torch.tensor([0.5, 0.5], requires_grad=True)
    old = torch.tensor([0.0, 0.0])
    loss, stats = clipped_policy_loss(new, old, torch.tensor([1.0, 1.0]), clip_range=0.2)
    (grad,) = torch.autograd.grad(loss, new)
    assert stats["clip_frac"] == 1.0
    assert torch.equal(grad, torch.zeros(2))  # A > 0 and r > 1 + ε: no push further


# -- advantages from many signals --------------------------------------------------------------------


def _batch(ref1, ref2, instruction, failed=None):
    sig = {
        "c/ref1": Signal(np.array(ref1, float), "reference", 1),
        "c/ref2": Signal(np.array(ref2, float), "reference", 2),
        "c/instruction": Signal(np.array(instruction, float), "instruction"),
    }
    return RewardBatch(sig, np.zeros(len(ref1), bool) if failed is None else np.array(failed))


@pytest.mark.parametrize("mode", ["sum", "normalized_sum", "min", "product"])
def test_group_advantages_have_zero_mean_and_skip_failed_images(mode):
    batch = _batch(
        [0.9, 0.2, 0.5, 0.7], [0.1, 0.8, 0.4, 0.6], [1.0, 0.5, 0.2, 0.9], failed=[False, False, True, False]
    )
    adv, reward = group_advantages(batch, {}, mode)
    assert math.isnan(adv[2]) and math.isnan(reward[2])
    assert abs(np.nanmean(adv)) < 1e-9
    if mode == "normalized_sum":  # every source zero-mean within the group on its own
        for s in batch.signals.values():
            assert abs(np.nanmean(normalise(s.values, ~batch.failed))) < 1e-9


def test_min_aggregation_is_driven_by_the_weakest_reference():
    """Image 0 keeps reference 1 perfectly and loses reference 2; image 1 keeps both fairly: min prefers 1, sum 0."""
    batch = _batch([1.0, 0.6, 0.3], [0.0, 0.6, 0.3], [0.0, 0.0, 0.0])
    assert np.argmax(group_advantages(batch, {}, "min")[0]) == 1
    batch = _batch([1.0, 0.6, 0.3], [0.5, 0.6, 0.3], [0.0, 0.0, 0.0])
    assert np.argmax(group_advantages(batch, {}, "sum")[0]) == 0


def test_normalised_sum_does_not_let_a_wide_signal_drown_a_narrow_one():
    # ref1 varies ten times more than ref2 but in the opposite order: raw sum follows ref1, normalised ties.
    batch = _batch([0.0, 1.0], [0.1, 0.0], [0.5, 0.5])
    raw = group_advantages(batch, {}, "sum")[0]
    norm = group_advantages(batch, {}, "normalized_sum")[0]
    assert raw[1] > raw[0]
    assert abs(norm[0] - norm[1]) < 0.01 < raw[1] - raw[0]


# -- reward plug-ins -----------------------------------------------------------------------------------


def test_reward_plugin_named_by_dotted_path_loads_and_bad_paths_say_what_is_wrong():
    src = load_source("tests.training_runs:custom_source", {"offset": 1.0}, TRUSTED)
    from PIL import Image

    out = check_batch(src([Image.new("RGB", (4, 4), "white")] * 2, None), "mine", 2)
    assert list(out.signals) == ["mine/brightness"] and np.allclose(out.signals["mine/brightness"].values, 2.0)
    with pytest.raises(RewardError, match="module 'no_such_pkg.rewards' cannot be imported"):
        load_source("no_such_pkg.rewards:make", trusted=("no_such_pkg",))
    with pytest.raises(RewardError, match="has no 'nope'"):
        load_source("tests.training_runs:nope", trusted=TRUSTED)
    with pytest.raises(RewardError, match="does not take these options"):
        load_source("tests.training_runs:custom_source", {"colour": 1}, TRUSTED)


def test_a_config_cannot_run_a_module_the_user_did_not_trust(tmp_path, capsys):
    for source, module in (("os:system", "os"), ("tests.training_runs:custom_source", "tests.training_runs")):
        with pytest.raises(RewardError) as err:
            load_source(source, {"command": "touch " + str(tmp_path / "ran")})
        assert (
            f"reward source {source!r}: module {module!r} is not trusted: a config's reward source runs as code "
            f"with your rights, and only training.* modules load unless you trust others; if you trust it, run "
            f"with --trust-module {module}" in str(err.value)
        )
    assert not (tmp_path / "ran").exists()
    # A package trusts its own modules.
    assert callable(load_source("tests.training_runs:custom_source", {}, trusted=("tests",)))
    # The command line refuses it before any model work, in one line.
    from training.rl.trainer import main

    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {
                "model": "uniref-default",
                "train_manifest": str(tmp_path / "m.jsonl"),
                "rewards": [{"source": "os:system", "options": {"command": "true"}}],
            }
        )
    )
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "error: reward source 'os:system': module 'os' is not trusted" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "batch, match",
    [
        (RewardBatch({"a": Signal(np.zeros(3))}), r"signal 'a' has shape \(3,\), expected \(2,\)"),
        (
            RewardBatch({"a": Signal(np.array([0.1, np.nan]))}),
            "signal 'a' is nan for image 1, which is not marked failed",
        ),
        (RewardBatch({"a": Signal(np.zeros(2), "style")}), "role 'style'"),
        ([0.1, 0.2], "returned list: return a RewardBatch"),
    ],
)
def test_a_plugin_returning_a_wrong_shape_or_nan_is_named(batch, match):
    with pytest.raises(RewardError, match=match):
        check_batch(batch, "mine", 2)


def test_a_failed_image_may_carry_nan():
    out = check_batch(
        RewardBatch({"a": Signal(np.array([0.3, np.nan]))}, np.array([False, True]), ["timeout"]), "j", 2
    )
    assert out.failed.tolist() == [False, True] and out.notes == ["timeout"]


# -- config --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, match",
    [
        ({"group_size": 1}, "group_size is 1: it must be at least 2"),
        ({"grup_size": 4}, "unknown config key 'grup_size'.*did you mean 'group_size'"),
        ({"aggregation": "max"}, "aggregation is 'max'"),
        ({"sde_window": [2, 9]}, r"sde_window is \[2, 9\]"),
        ({"sde_window": [3, 4]}, "holds only the last rollout step"),
        ({"rewards": [{"source": "checker", "wieght": 2}]}, "unknown config key 'wieght' in rewards\\[0\\]"),
        ({"seed": 2**64}, "seed is 18446744073709551616: it must be at most 4294967295"),
        ({"output_dir": __file__}, "output_dir .*test_msgrpo.py is a file, not a folder: give a folder path"),
    ],
)
def test_bad_rl_config_keys_are_named(over, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(rl_config("m", "p.jsonl", "o", **over))


# -- runs ----------------------------------------------------------------------------------------------


def test_msgrpo_run_logs_every_source_and_resumes_exactly(tiny_model, prompts, tmp_path):
    """A 2-step run from a tiny model: per-reference rewards logged, a plot and rollout grids written, a final
    checkpoint, TensorBoard events as a user's run (the default) writes them; resumed from step 1 it ends with the
    same weights as the uninterrupted run."""
    from training.common import checkpoint as ckpt_mod
    from training.rl.config import config_from_dict as rl_from_dict
    from training.rl.trainer import run

    cfg = rl_from_dict(
        rl_config(tiny_model, prompts, tmp_path / "a", save_every=1, keep_checkpoints=5, tensorboard=True)
    )
    res = run(cfg, trusted_modules=TRUSTED)
    assert res.global_step == 2
    rec = res.records[-1]
    for key in (
        "reward/checker/ref1",
        "reward/checker/ref2",
        "reward/checker/instruction",
        "reward/checker/quality",
        "reward_std/checker/ref1",
        "loss",
    ):
        assert key in rec and math.isfinite(rec[key]), key
    assert rec["items"] == 2 * 3 * 2  # groups × G × SDE steps in the window (no image dropped)
    assert rec["groups_without_signal"] == 0 and "reward/tests.training_runs:custom_source/brightness" in rec
    out = tmp_path / "a"
    assert (out / "rewards.png").stat().st_size > 0 and sorted(p.name for p in (out / "rollouts").iterdir())
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("kind") == "train"] == [1, 2]
    ckpts = ckpt_mod.complete_checkpoints(out)
    assert [ckpt_mod.read_state(p)["global_step"] for p in ckpts] == [1, 2]
    start = ckpt_mod.load_tensors(ckpts[0], ckpt_mod.TRAINABLE_FILE)
    final = ckpt_mod.load_tensors(ckpts[-1], ckpt_mod.TRAINABLE_FILE)
    assert any(not torch.equal(start[k], final[k]) for k in final)  # it learned something

    # Resume: a copy of step 1 continued to step 2 matches the run that never stopped.
    import shutil

    b = tmp_path / "b"
    (b / ckpt_mod.CHECKPOINTS).mkdir(parents=True)
    shutil.copytree(ckpts[0], b / ckpt_mod.CHECKPOINTS / ckpts[0].name)
    reset_accelerate_state()
    res_b = run(
        rl_from_dict(rl_config(tiny_model, prompts, b, save_every=1, keep_checkpoints=5)),
        resume="auto",
        trusted_modules=TRUSTED,
    )
    assert res_b.global_step == 2 and len(res_b.records) == 1
    again = ckpt_mod.load_tensors(ckpt_mod.complete_checkpoints(b)[-1], ckpt_mod.TRAINABLE_FILE)
    for k in final:
        torch.testing.assert_close(again[k], final[k], rtol=0, atol=1e-6)


LAUNCHERS = {
    "torchrun": torchrun("29519"),
    # accelerate's own launcher, as a multi-GPU user runs it; on a CPU-only machine --multi_gpu still starts two
    # gloo processes (--cpu would start one).
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29521",
    ],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_take_whole_groups_and_train_like_one(tiny_model, prompts, tmp_path, launcher, monkeypatch):
    """2 groups per step: one process rolls out both, two processes one each (started by torchrun or by
    ``accelerate launch``). Rewards, advantages (per group) and the summed-then-divided gradients agree: the
    logged rewards and losses match, and with plain SGD (tests/sgd.py: the update is -lr · gradient) so do the
    weight updates."""
    from tests.sgd import assert_same_updates, sgd_script, start_weights, use_sgd
    from training.common import checkpoint as ckpt_mod
    from training.rl.config import config_from_dict as rl_from_dict
    from training.rl.trainer import run

    use_sgd(monkeypatch)
    # SGD moves a weight by lr · gradient; the policy gradient here is ~1e-3, so lr 1 lifts updates far above rounding.
    run(rl_from_dict(rl_config(tiny_model, prompts, tmp_path / "one", grid_every=0, lr=1.0)), trusted_modules=TRUSTED)
    config = tmp_path / "two.json"
    config.write_text(json.dumps(rl_config(tiny_model, prompts, tmp_path / "two", grid_every=0, lr=1.0)))
    args = (sgd_script(tmp_path), "training.msgrpo", "--config", str(config), "--trust-module", TRUSTED[0])
    finish(launch(LAUNCHERS[launcher], *args))

    def records(out):
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"train"' in line]

    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["items"] for r in one] == [r["items"] for r in two] == [12, 12]
    assert [r["processes"] for r in one] == [1, 1] and [r["processes"] for r in two] == [2, 2]
    for a, b in zip(one, two):
        for key in ("reward/checker/ref1", "reward/checker/ref2", "reward/total", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    w1 = ckpt_mod.load_tensors(ckpt_mod.complete_checkpoints(tmp_path / "one")[-1], ckpt_mod.TRAINABLE_FILE)
    w2 = ckpt_mod.load_tensors(ckpt_mod.complete_checkpoints(tmp_path / "two")[-1], ckpt_mod.TRAINABLE_FILE)
    assert_same_updates(start_weights(tiny_model), w1, w2)


def test_shipped_rl_configs_load():
    from training.rl.config import load_config

    # msgrpo_base.json holds the settings, not the paths: it loads through the files that name it as their base.
    configs = sorted(p for p in (ROOT / "training" / "configs").glob("msgrpo_*.json") if p.name != "msgrpo_base.json")
    assert configs
    for path in configs:
        cfg = load_config(path)
        assert cfg.group_size >= 2 and cfg.rewards


def test_groups_whose_images_all_score_alike_take_no_step(tiny_model, prompts, tmp_path):
    """A reward that never varies gives zero advantages: no re-scoring and no optimizer step (Adam would
    otherwise drift on momentum), and the log says so."""
    from training.common import checkpoint as ckpt_mod
    from training.rl.config import config_from_dict as rl_from_dict
    from training.rl.trainer import run
    from uniref_core.model import load_components

    cfg = rl_config(
        tiny_model,
        prompts,
        tmp_path / "c",
        steps=1,
        grid_every=0,
        rewards=[{"source": "tests.training_runs:constant_source"}],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(rl_from_dict(cfg), trusted_modules=TRUSTED)
    assert res.records[0]["groups_without_signal"] == 2 and res.records[0]["items"] == 0
    # The schedule still advances; PyTorch's "scheduler before optimizer" warning would only confuse.
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    after = ckpt_mod.load_tensors(ckpt_mod.complete_checkpoints(tmp_path / "c")[-1], ckpt_mod.TRAINABLE_FILE)
    before = dict(load_components(tiny_model, device="cpu", dtype="fp32").transformer.named_parameters())
    assert all(torch.equal(after[k], before[k].detach()) for k in after)
