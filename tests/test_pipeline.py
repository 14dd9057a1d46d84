"""The engine as callers use it: SELF sequences, progress, cancel, preview, img2img, SDE, bad input."""

import numpy as np
import pytest
import torch
from conftest import make_refs
from PIL import Image

from uniref_core import UniRefCancelled, UniRefError, pil_to_comfy
from uniref_core.latents import pack_latents, to_pixels, vae_encode

PROMPT = "put the object from Picture 2 on the left of Picture 1"


def capture_transformer_calls(pipe, monkeypatch):
    calls = []
    real = pipe.c.transformer.forward

    def spy(*args, **kwargs):
        calls.append({"length": kwargs["hidden_states"].shape[1], "img_shapes": kwargs["img_shapes"]})
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe.c.transformer, "forward", spy)
    return calls


def test_self_sequence_is_target_then_each_reference_within_budget(pipe, monkeypatch):
    refs = make_refs([(640, 480), (300, 900), (800, 800), (1000, 250)])
    budget = 192 * 192
    cond = pipe.encode(refs, PROMPT, cfg=1.0, budget=budget, width=64, height=64)
    calls = capture_transformer_calls(pipe, monkeypatch)
    pipe.sample(cond, steps=2, cfg=1.0)
    plan = cond.plan
    assert len(calls) == 2
    assert calls[0]["length"] == plan.sequence_length == 16 + plan.reference_tokens
    # RoPE layout: target first, then Picture 1…K in order, each at its own grid.
    assert calls[0]["img_shapes"] == [plan.img_shapes]
    assert [s[1:] for s in plan.img_shapes[1:]] == [(r.vae[1] // 16, r.vae[0] // 16) for r in plan.references]
    assert (
        plan.reference_tokens * 256 <= budget + 16 * sum(w + h for w, h in (r.vae for r in plan.references)) + 4 * 256
    )
    # Each reference keeps its orientation.
    assert plan.references[1].vae[1] > plan.references[1].vae[0]
    assert plan.references[3].vae[0] > plan.references[3].vae[1]


def test_references_may_be_paths_numpy_and_comfy_tensors(pipe, tmp_path):
    a, b, c = make_refs([(96, 64), (64, 96), (80, 80)])
    path = tmp_path / "a.png"
    a.save(path)
    mixed = [str(path), np.asarray(b), pil_to_comfy(c)]
    r1 = pipe.edit(mixed, PROMPT, cfg=1.0, steps=2, budget=128 * 128, width=64, height=64)
    r2 = pipe.edit([a, b, c], PROMPT, cfg=1.0, steps=2, budget=128 * 128, width=64, height=64)
    assert np.array_equal(np.asarray(r1.images[0]), np.asarray(r2.images[0]))


def test_progress_reports_every_step_and_preview_is_an_image(pipe):
    refs = make_refs([(96, 64)])
    seen = []
    result = pipe.edit(refs, PROMPT, cfg=1.0, steps=4, budget=128 * 128, width=96, height=64, on_step=seen.append)
    assert [s.step for s in seen] == [1, 2, 3, 4] and all(s.total == 4 for s in seen)
    assert seen[-1].sigma == 0.0
    prev = pipe.preview(seen[1].x0, 96, 64)
    assert prev.size == (12, 8) and prev.mode == "RGB"
    assert result.summary().startswith("1 image(s) 96×64")


def test_preview_map_shows_colours(pipe):
    red = Image.new("RGB", (64, 64), (230, 30, 30))
    blue = Image.new("RGB", (64, 64), (30, 30, 230))
    for img, channel in ((red, 0), (blue, 2)):
        packed = pack_latents(vae_encode(pipe.c.vae, to_pixels(img, 64, 64)))
        mean = np.asarray(pipe.preview(packed, 64, 64)).reshape(-1, 3).mean(0)
        assert mean.argmax() == channel


def test_cancel_stops_within_one_step_and_next_run_is_normal(pipe):
    refs = make_refs([(96, 64)])
    cond = pipe.encode(refs, PROMPT, cfg=1.0, budget=128 * 128, width=64, height=64)
    seen = []
    with pytest.raises(UniRefCancelled):
        pipe.sample(cond, steps=10, cfg=1.0, on_step=seen.append, is_cancelled=lambda: len(seen) >= 2)
    assert len(seen) == 2
    again = pipe.sample(cond, steps=3, cfg=1.0, seed=5)
    fresh = pipe.sample(cond, steps=3, cfg=1.0, seed=5)
    assert torch.equal(again, fresh)


def test_low_denoise_keeps_the_init_image(pipe):
    refs = make_refs([(96, 64)])
    init = make_refs([(64, 64)], seed=9)[0]
    cond = pipe.encode(refs, PROMPT, cfg=1.0, budget=128 * 128, width=64, height=64)
    roundtrip = np.asarray(pipe.decode(pack_latents(vae_encode(pipe.c.vae, to_pixels(init, 64, 64))), 64, 64)[0])
    seen = []
    pipe.sample(cond, steps=50, cfg=1.0, denoise=0.04, init_image=init, on_step=seen.append)
    assert seen[0].total == 2  # 4 % of 50 steps

    def error(denoise):
        out = pipe.decode(pipe.sample(cond, steps=50, cfg=1.0, denoise=denoise, init_image=init), 64, 64)[0]
        return np.abs(np.asarray(out).astype(float) - roundtrip).mean()

    low, mid, full = error(0.04), error(0.5), error(1.0)
    assert low < mid < full
    assert low < 0.5 * full


def test_sde_sampler_is_seeded_and_differs_from_ode(pipe):
    refs = make_refs([(96, 64)])
    cond = pipe.encode(refs, PROMPT, cfg=1.0, budget=128 * 128, width=64, height=64)
    a = pipe.sample(cond, steps=4, cfg=1.0, sampler="sde", seed=1)
    b = pipe.sample(cond, steps=4, cfg=1.0, sampler="sde", seed=1)
    ode = pipe.sample(cond, steps=4, cfg=1.0, sampler="ode", seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, ode, atol=1e-3)
    batch = pipe.sample(cond, steps=4, cfg=1.0, sampler="sde", seed=1, num_images=2)
    assert torch.allclose(batch[:1], a, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps is 0: it must be between 1 and 1000"),
        ({"cfg": 0.5}, "cfg is 0.5: it must be between 1.0 and 30.0"),
        ({"denoise": 1.5}, "denoise is 1.5"),
        ({"denoise": 0.5}, "denoise < 1 needs an init image"),
        ({"sampler": "dpm"}, "sampler is 'dpm': use one of ode, sde"),
        ({"num_images": 0}, "num_images is 0"),
        ({"sampler": "sde", "steps": 4, "sde_window": (2, 6)}, r"sde_window is \(2, 6\).*≤ 4"),
        ({"steps": 4, "sde_window": (0, 2)}, "sde_window is set but sampler is 'ode'"),
        ({"seed": 2**64}, "seed is 18446744073709551616: it must be between 0 and 18446744073709551615"),
        ({"seed": -1}, "seed is -1: it must be between 0"),
        ({"seed": 2**64 - 1, "num_images": 2}, r"between 0 and 18446744073709551614 \(image i of 2 uses seed \+ i\)"),
    ],
)
def test_bad_sampling_options_are_named(pipe, kwargs, match):
    cond = pipe.encode(make_refs([(64, 64)]), PROMPT, cfg=1.0, budget=64 * 64, width=64, height=64)
    with pytest.raises(UniRefError, match=match):
        pipe.sample(cond, **{"cfg": 1.0, **kwargs})


def test_unknown_sampling_option_is_named(pipe):
    cond = pipe.encode(make_refs([(64, 64)]), PROMPT, cfg=1.0, budget=64 * 64, width=64, height=64)
    with pytest.raises(TypeError, match="unknown sampling option.*samplr"):
        pipe.sample(cond, cfg=1.0, samplr="sde")


def test_rollout_steps_carry_what_rl_rescores_with_the_same_model_call(pipe):
    """The one denoising loop: its last step is what ``sample`` returns; each SDE step's log-probability is
    the one `sde_step` gives back when the same velocity re-scores the kept latents (policy ratio 1);
    steps outside the SDE window are plain Euler steps with no log-probability."""
    from uniref_core import SamplingOptions
    from uniref_core.sampling import euler_step, sde_step

    cond = pipe.encode(make_refs([(96, 64)]), PROMPT, cfg=1.0, budget=128 * 128, width=64, height=64)
    opts = SamplingOptions(seed=3, steps=5, cfg=1.0, sampler="sde", num_images=2, sde_window=(1, 3))
    steps = list(pipe.denoise(cond, opts))
    assert [s.step for s in steps] == [1, 2, 3, 4, 5] and steps[0].total == 5
    assert torch.equal(steps[-1].x_next, pipe.sample(cond, opts))
    assert [s.log_prob is not None for s in steps] == [False, True, True, False, False]
    for s in steps:
        assert torch.equal(s.x, steps[s.step - 2].x_next) if s.step > 1 else True
        v = pipe.velocity(s.x, s.timestep, cond, 1.0)
        if s.log_prob is None:
            assert torch.equal(s.x_next, euler_step(s.x, v, s.sigma, s.sigma_next))
        else:
            _, again, _, _ = sde_step(s.x, v, s.sigma, s.sigma_next, eta=opts.eta, prev_sample=s.x_next)
            assert again.shape == (2,)
            torch.testing.assert_close(again, s.log_prob, rtol=0, atol=1e-5)
    # The window's noise moves the result off the ODE sampler's.
    ode = pipe.sample(cond, opts, sampler="ode", sde_window=None)
    assert not torch.allclose(ode, steps[-1].x_next, atol=1e-3)


def test_bad_encode_inputs_are_named(pipe, tmp_path):
    with pytest.raises(UniRefError, match="connect at least one reference"):
        pipe.encode([], PROMPT, cfg=1.0)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UniRefError, match="reference 2"):
        pipe.encode([make_refs([(64, 64)])[0], str(empty)], PROMPT, cfg=1.0)
    with pytest.raises(UniRefError, match="output width is 100 px"):
        pipe.encode(make_refs([(64, 64)]), PROMPT, cfg=1.0, width=100, height=64)
    with pytest.raises(UniRefError, match="reference 1 is 4000×70 px.*raise the budget"):
        pipe.encode(make_refs([(4000, 70)]), PROMPT, cfg=1.0, budget=64 * 64)


def test_a_prompt_the_model_cannot_take_is_named_not_a_traceback(pipe):
    """What a ComfyUI workflow's JSON can hold: a lone surrogate, or a prompt longer than the positions left to the
    text (the tiny encoder's 4096, the transformer's RoPE after the longest image side): one UniRefError each, with
    the count and the limit, before any transformer call."""
    refs = make_refs([(64, 64)])
    with pytest.raises(UniRefError, match="prompt is not valid UTF-8 text: character 4 is a lone surrogate U\\+D800"):
        pipe.encode(refs, "put\ud800", cfg=1.0, budget=64 * 64, width=64, height=64)
    with pytest.raises(UniRefError, match="negative prompt is not valid UTF-8 text: character 1 is the byte 0xe9"):
        pipe.encode(refs, PROMPT, "\udce9", cfg=2.0, budget=64 * 64, width=64, height=64)
    with pytest.raises(
        UniRefError,
        match=r"prompt is too long: .* makes 5\d\d\d tokens, and the text encoder's 4096 "
        r"positions .* at most 4032; shorten it by at least",
    ):
        pipe.encode(refs, "red " * 5000, cfg=1.0, budget=64 * 64, width=64, height=64)
    # A long, thin output moves the text's first RoPE position to half its side: less room for the prompt.
    with pytest.raises(
        UniRefError,
        match=r"prompt is too long: .* makes 1\d\d\d tokens, and at this size \(the "
        r"longest image side is 7500 tokens\) the transformer's 4096 RoPE positions leave it at "
        r"most 3",
    ):
        pipe.encode(refs, "red " * 1000, cfg=1.0, budget=64 * 64, width=120000, height=16)
    assert pipe.encode(refs, "red " * 300, cfg=1.0, budget=64 * 64, width=64, height=64).positive.embeds.shape[1] > 300
