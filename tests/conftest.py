"""Shared fixtures: tiny random models of the Qwen-Image-Edit architecture, built once per session; the trainer
tests' fixtures come from tests/training_runs.py."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from uniref_core.tiny import make_tiny_model

pytest_plugins = ["tests.training_runs"]

# Tests that need what a machine may lack, and the variable that skips them there.
SKIP_MARKERS = {"comfy": "UNIREF_SKIP_COMFY", "browser": "UNIREF_SKIP_BROWSER"}


def pytest_collection_modifyitems(config, items):
    """UNIREF_SKIP_COMFY=1 skips the tests marked `comfy` (real ComfyUI hosts), UNIREF_SKIP_BROWSER=1 those marked
    `browser` (headless Chromium)."""
    for marker, variable in SKIP_MARKERS.items():
        if os.environ.get(variable) == "1":
            skip = pytest.mark.skip(reason=f"{variable}=1: {marker} tests skipped")
            for item in items:
                if item.get_closest_marker(marker):
                    item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2509-style tiny model folder (zero_cond_t off)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_2511(tmp_path_factory):
    """A 2511-style tiny model folder (zero_cond_t on: references modulated at t = 0)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny2511") / "model", zero_cond_t=True)


@pytest.fixture(scope="session")
def pipe(tiny_model):
    from uniref_core import UniRefPipeline

    return UniRefPipeline.from_pretrained(tiny_model)


def make_refs(sizes, seed=0):
    """Reference images with structure (a gradient and a coloured box) at the given sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1)
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
        img = img + rng.integers(-20, 20, img.shape)
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="session")
def tiny_model_4x(tmp_path_factory):
    """A tiny model with a 4x VAE (two down-sampling stages): 8 px tokens, like the built-in default model."""
    from uniref_core.tiny import VAE_4X

    return make_tiny_model(tmp_path_factory.mktemp("tiny4x") / "model", vae=VAE_4X)


# LoRA files for tests: random low-rank changes on these layers of every block, saved in a real file layout.
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_v",
    "attn.add_k_proj",
    "attn.to_out.0",
    "img_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
)


def random_lora(transformer, rank=4, alpha=8.0, seed=0, scale=0.3):
    """module → (down, up, alpha) on LORA_TARGETS of every block, big enough to change the image visibly."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    out = {}
    for i in range(len(transformer.transformer_blocks)):
        for t in LORA_TARGETS:
            name = f"transformer_blocks.{i}.{t}"
            w = modules[name].weight
            down = torch.randn(rank, w.shape[1], generator=g) * scale
            up = torch.randn(w.shape[0], rank, generator=g) * scale
            out[name] = (down, up, alpha)
    return out


def write_lora(layers, path, layout):
    """Save ``layers`` as a LoRA file in one of the layouts real files use."""
    sd, metadata = {}, None
    for name, (down, up, alpha) in layers.items():
        if layout == "kohya":  # musubi-tuner / kohya: flattened names, lora_down / lora_up, alpha per layer
            key = "lora_unet_" + name.replace(".", "_")
            sd.update(
                {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
            )
        elif layout == "comfy":  # ComfyUI / ai-toolkit (and training.export --lora)
            key = "diffusion_model." + name
            sd.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.alpha": torch.tensor(alpha)})
        elif layout == "diffusers":  # save_lora_weights: no alpha tensors; lora_alpha / r in the file's metadata
            sd.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
            rank = down.shape[0]
            metadata = {
                "lora_adapter_metadata": json.dumps(
                    {
                        "transformer.r": rank,
                        "transformer.lora_alpha": alpha,
                        "transformer.target_modules": list(LORA_TARGETS),
                    }
                )
            }
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="session")
def tiny_lora(tiny_model, tmp_path_factory):
    """A LoRA for `tiny_model` in ComfyUI's layout (what training.export --lora writes)."""
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_model / "transformer")
    return write_lora(
        random_lora(transformer, seed=1), tmp_path_factory.mktemp("lora") / "uniref_tiny_lora.safetensors", "comfy"
    )


def tiny_text_encoder():
    """A tiny Qwen2.5-VL with the real tokenizer's vocabulary and ComfyUI's fixed head size (128)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=151936,
            hidden_size=256,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
            bos_token_id=151643,
            eos_token_id=151645,
        ),
        vision_config=dict(
            hidden_size=64,
            depth=2,
            intermediate_size=48,
            num_heads=16,
            out_hidden_size=256,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def comfy_layout(text_encoder):
    """transformers' state dict in ComfyUI's flat text-encoder layout (no head)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        if k == "lm_head.weight":
            continue
        k = k.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        out[k] = v.contiguous()
    return out


@pytest.fixture(scope="session")
def comfy_single_files(tmp_path_factory):
    """A tiny Qwen-Image-Edit as ComfyUI's three single files (the VAE built by ComfyUI's own class in the 0.30.0
    host) + ComfyUI's tokenizer folder: (files, tokenizer dir, the transformer, the text encoder)."""
    from comfy_child import comfy_vae_file
    from comfyhost import comfy_hosts
    from diffusers import QwenImageTransformer2DModel

    tmp = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(1)
    transformer = QwenImageTransformer2DModel(
        num_layers=2,
        attention_head_dim=128,
        num_attention_heads=2,
        joint_attention_dim=256,
        in_channels=64,
        out_channels=16,
    ).eval()
    te = tiny_text_encoder()
    files = {
        "diffusion_model": tmp / "qwen_image_edit_tiny.safetensors",
        "text_encoder": tmp / "qwen_2.5_vl_tiny.safetensors",
    }
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(files["diffusion_model"]))
    save_file(comfy_layout(te), str(files["text_encoder"]))
    files["vae"], _ = comfy_vae_file(tmp, "0.30.0")  # built by ComfyUI's own Wan VAE class, in its file layout
    tokenizer = comfy_hosts.ensure_host("0.30.0").comfy_dir / "comfy" / "text_encoders" / "qwen25_tokenizer"
    return files, tokenizer, transformer, te


#: Blocks of `slow_model`: a step is many blocks, so a cancel inside it can be told from one between steps.
SLOW_LAYERS = 16


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory):
    """The tiny model with SLOW_LAYERS transformer blocks: at 768² one step takes seconds on a CPU."""
    return make_tiny_model(tmp_path_factory.mktemp("slow") / "model", transformer={"num_layers": SLOW_LAYERS})
