"""An edit from ComfyUI's three single files (diffusion model, text encoder, VAE) and ComfyUI's own Qwen2.5
tokenizer folder: `load_single_files` assembles a pipeline whose per_image edit is the image diffusers'
QwenImageEditPlusPipeline makes from the same networks, and mismatched parts are clear errors."""

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as dq
import numpy as np
import pytest
import torch
from conftest import make_refs
from safetensors.torch import save_file

from uniref_core import UniRefPipeline
from uniref_core.comfy_files import load_comfy_vae, load_single_files
from uniref_core.errors import UniRefError

PROMPT = "put the red object from Picture 1 on the left of the background of Picture 2"
AREA = 64 * 64


@pytest.mark.comfy
def test_single_files_edit_like_diffusers_pipeline_on_the_same_networks(comfy_single_files, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    from uniref_core.tiny import SCHEDULER_CONFIG

    files, tokenizer, transformer, te = comfy_single_files
    components = load_single_files(tokenizer_dir=tokenizer, dtype="fp32", **files)
    ours = UniRefPipeline(components)
    refs = make_refs([(96, 64), (80, 120)], seed=2)
    monkeypatch.setattr(dq, "VAE_IMAGE_SIZE", AREA)
    got = ours.edit(
        refs, PROMPT, " ", mode="per_image", per_image_area=AREA, cfg=2.0, seed=5, steps=3, width=64, height=64
    )
    ref = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=load_comfy_vae(files["vae"]),
        text_encoder=te,
        tokenizer=components.processor.tokenizer,
        processor=components.processor,
        transformer=transformer,
    )
    ref.set_progress_bar_config(disable=True)
    want = ref(
        image=refs,
        prompt=PROMPT,
        negative_prompt=" ",
        true_cfg_scale=2.0,
        height=64,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    got, want = np.asarray(got.images[0]).astype(int), np.asarray(want).astype(int)
    assert got.shape == want.shape == (64, 64, 3)
    assert want.std() > 5
    assert np.abs(got - want).max() <= 1


@pytest.mark.comfy
def test_parts_that_do_not_belong_together_are_clear_errors(comfy_single_files, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    files, tokenizer, _, _ = comfy_single_files
    other = QwenImageTransformer2DModel(
        num_layers=1,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=128,
        in_channels=64,
        out_channels=16,
    )
    wrong = tmp_path / "qwen_image_other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong))
    with pytest.raises(UniRefError, match="gives 256-wide text states but qwen_image_other.safetensors expects 128"):
        load_single_files(wrong, files["text_encoder"], files["vae"], tokenizer)
    with pytest.raises(UniRefError, match="has no vocab.json / merges.txt.*qwen25_tokenizer"):
        load_single_files(files["diffusion_model"], files["text_encoder"], files["vae"], tmp_path)
    with pytest.raises(UniRefError, match="is not a Qwen-Image VAE"):
        load_single_files(files["diffusion_model"], files["text_encoder"], files["text_encoder"], tokenizer)


@pytest.mark.comfy
def test_cli_edits_from_single_files_like_the_pipeline(comfy_single_files, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    files, tokenizer, _, _ = comfy_single_files
    refs = make_refs([(96, 64), (80, 120)], seed=3)
    ref_paths = []
    for i, r in enumerate(refs):
        ref_paths += ["--ref", str(tmp_path / f"r{i}.png")]
        r.save(tmp_path / f"r{i}.png")
    out = tmp_path / "out.png"
    root = Path(__file__).resolve().parent.parent
    args = [
        sys.executable,
        "-m",
        "uniref_core",
        "edit",
        "--diffusion-model",
        files["diffusion_model"],
        "--text-encoder",
        files["text_encoder"],
        "--vae",
        files["vae"],
        "--tokenizer",
        tokenizer,
        *ref_paths,
        "--prompt",
        PROMPT,
        "--budget",
        "128",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--cfg",
        "1",
        "--seed",
        "4",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--quiet",
        "-o",
        out,
    ]
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "qwen_image_edit_tiny.safetensors" in r.stdout
    pipe = UniRefPipeline(load_single_files(tokenizer_dir=tokenizer, dtype="fp32", **files))
    want = pipe.edit(
        [Image.open(tmp_path / f"r{i}.png") for i in range(2)],
        PROMPT,
        None,
        budget=128 * 128,
        width=64,
        height=64,
        steps=2,
        cfg=1.0,
        seed=4,
    ).images[0]
    assert np.abs(np.asarray(Image.open(out)).astype(int) - np.asarray(want).astype(int)).max() <= 1
    half = subprocess.run(
        [str(a) for a in args[:6] + ref_paths + ["--prompt", "x", "-o", out]],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert half.returncode != 0 and "--vae, --tokenizer is missing" in half.stderr
