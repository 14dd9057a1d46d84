"""The token size comes from the model: 16 px for real checkpoints (8× VAE), 8 px for a 4× VAE.

A model with a 4× VAE is planned, packed, sampled and decoded in 8 px tokens, and its ``per_image``
edit is the image diffusers' pipeline makes of it (diffusers takes the VAE scale from the VAE config too).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as dq
import numpy as np
import pytest
from conftest import make_refs
from parity import AREA, PROMPT, SIZES, diffusers_edit

from uniref_core import UniRefPipeline
from uniref_core.budget import plan_references
from uniref_core.errors import UniRefError
from uniref_core.model import check_model_folder, token_px_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe4(tiny_model_4x):
    return UniRefPipeline.from_pretrained(tiny_model_4x)


def test_token_size_is_read_from_the_model_folder(tiny_model, tiny_model_4x, pipe4):
    assert token_px_of(tiny_model) == 16
    assert token_px_of(tiny_model_4x) == 8
    assert (pipe4.vae_scale, pipe4.token_px) == (4, 8)


@pytest.mark.parametrize("k,cfg", [(1, 1.0), (3, 3.0)])
def test_per_image_edit_with_a_4x_vae_reproduces_diffusers(tiny_model_4x, pipe4, monkeypatch, k, cfg):
    monkeypatch.setattr(dq, "VAE_IMAGE_SIZE", AREA)
    refs = make_refs(SIZES[:k], seed=k)
    want = diffusers_edit(tiny_model_4x, refs, cfg, seed=5, steps=3, width=72, height=104)
    got = pipe4.edit(
        refs, PROMPT, " ", mode="per_image", per_image_area=AREA, cfg=cfg, seed=5, steps=3, width=72, height=104
    )
    img = np.asarray(got.images[0]).astype(int)
    # 72 and 104 are multiples of 8, not of 16: only a model of 8 px tokens can make this size.
    assert img.shape == want.shape == (104, 72, 3)
    assert np.abs(img - want).max() <= 1
    assert want.std() > 5
    assert got.plan.output_tokens == (72 // 8) * (104 // 8)
    assert got.latents.shape[1] == got.plan.output_tokens


def test_budget_plan_in_8px_tokens_holds_the_budget_with_finer_rounding():
    sizes = [(150, 112), (104, 144), (160, 96)]
    p16 = plan_references(sizes, "budget", 128 * 128, width=128, height=128)
    p8 = plan_references(sizes, "budget", 128 * 128, width=128, height=128, token_px=8)
    assert p16.token_px == 16 and p8.token_px == 8
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in (r.vae for r in p8.references))
    assert p8.output_tokens == 256 and p16.output_tokens == 64
    # The same pixels are 4x the tokens; finer rounding keeps the total closer to the budget.
    px8 = sum(w * h for w, h in (r.vae for r in p8.references))
    px16 = sum(w * h for w, h in (r.vae for r in p16.references))
    assert abs(px8 - 128 * 128) <= abs(px16 - 128 * 128)
    assert p8.reference_tokens == px8 // 64
    assert p8.img_shapes[0] == (1, 16, 16)
    assert [s[1:] for s in p8.img_shapes[1:]] == [(h // 8, w // 8) for w, h in (r.vae for r in p8.references)]


def test_output_size_must_be_a_multiple_of_the_models_token(pipe, pipe4):
    refs = make_refs([(64, 64)])
    with pytest.raises(UniRefError, match=r"output width is 72 px: .* 16 px tokens, so give a multiple of 16; try 64"):
        pipe.encode(refs, PROMPT, width=72, height=64)
    with pytest.raises(UniRefError, match=r"output height is 60 px: .* 8 px tokens, so give a multiple of 8; try 64"):
        pipe4.encode(refs, PROMPT, width=72, height=60)


def test_a_vae_config_the_engine_cannot_size_for_names_the_folder(tiny_model, tmp_path):
    bad = tmp_path / "bad-vae"
    shutil.copytree(tiny_model, bad)
    cfg_path = bad / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["temperal_downsample"] = [False, True]  # two stages, but dim_mult has four entries: three stages
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UniRefError, match=r"bad-vae.*temperal_downsample.*give len\(dim_mult\) - 1 entries"):
        check_model_folder(bad)


def test_cli_plan_uses_16px_tokens_without_a_model_and_the_models_with_one(tiny_model_4x, tmp_path):
    refs = make_refs([(150, 112), (104, 144)])
    paths = []
    for i, r in enumerate(refs):
        paths += ["--ref", str(tmp_path / f"r{i}.png")]
        r.save(tmp_path / f"r{i}.png")

    def plan(*extra):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "uniref_core",
                "plan",
                *paths,
                "--budget",
                "128",
                "--width",
                "128",
                "--height",
                "128",
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    real, four = plan(), plan("--model", str(tiny_model_4x))
    assert real["token_px"] == 16 and real["output"]["tokens"] == 64
    assert four["token_px"] == 8 and four["output"]["tokens"] == 256
