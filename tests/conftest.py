"""Shared fixtures: tiny random models of the Qwen-Image-Edit architecture, built once per session."""

import numpy as np
import pytest
from PIL import Image

from uniref_core.tiny import make_tiny_model


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
