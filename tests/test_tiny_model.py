"""The tiny offline model that the other tests, the benchmarks and the examples build on."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from uniref_core.tiny import TEMPLATE_PREFIX_TOKENS, make_tiny_model

COMPONENTS = ["transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"]
MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline.from_pretrained(tiny)


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_matches_published_repos(tiny):
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    for name in COMPONENTS:
        assert (tiny / name).is_dir(), name
        assert name in index, name
    files = [p for p in tiny.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"transformer", "vae", "text_encoder"}
    pickles = [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    assert pickles == []
    assert sum(p.stat().st_size for p in files) < MAX_BYTES


def test_pipeline_edits_two_references_of_different_sizes(pipe, monkeypatch):
    import torch
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 128 * 128)
    rng = np.random.default_rng(0)
    refs = [
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)),  # 96x64
        Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)),  # 64x80
    ]
    out = pipe(
        image=refs,
        prompt="Put the red circle from Picture 1 on the left of the object in Picture 2.",
        negative_prompt=" ",
        true_cfg_scale=2.0,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert out.size == (64, 64)
    pixels = np.asarray(out)
    assert pixels.std() > 0


def test_tokenizer_matches_the_pipeline_template(pipe):
    tok = pipe.tokenizer
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert prefix.endswith("<|im_start|>user\n")
    assert len(tok(prefix)["input_ids"]) == TEMPLATE_PREFIX_TOKENS == pipe.prompt_template_encode_start_idx
    for word in ["Picture", "object", "background", "left", "red"]:
        assert len(tok(word)["input_ids"]) == 1, word
        assert len(tok(" " + word)["input_ids"]) == 1, word
    config = pipe.text_encoder.config
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.vocab_size >= len(tok)


def test_same_seed_gives_bitwise_identical_folders(tiny, tmp_path):
    again = _files(make_tiny_model(tmp_path / "again", seed=0))
    first = _files(tiny)
    assert first.keys() == again.keys()
    for name in first:
        assert first[name] == again[name], name


def test_zero_cond_t_variant_is_stored_and_runs(tiny, tmp_path, monkeypatch):
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    folder = make_tiny_model(tmp_path / "2511", zero_cond_t=True, seed=1)
    assert json.loads((tiny / "transformer/config.json").read_text())["zero_cond_t"] is False
    assert json.loads((folder / "transformer/config.json").read_text())["zero_cond_t"] is True
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (tiny / weights).read_bytes() != (folder / weights).read_bytes()  # the seed matters

    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 128 * 128)
    pipe = QwenImageEditPlusPipeline.from_pretrained(folder)
    out = pipe(
        image=[Image.new("RGB", (64, 64), "red")],
        prompt="Make the background blue.",
        height=64,
        width=64,
        num_inference_steps=2,  # 1 step is 0/0 in the scheduler with shift_terminal, as for the real model
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()
