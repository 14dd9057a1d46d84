"""VAE tiling for large images: diffusers' own tiled encode and decode (256 px tiles, 64 px overlap), chosen per
image by ``UniRefPipeline.vae_tiling`` (auto / on / off) and the CLI's ``--vae-tiling``. Auto tiles only above
2 MP, so every default-sized output decodes as diffusers' pipeline decodes it."""

import numpy as np
import pytest
import torch
from PIL import Image

from uniref_core.errors import UniRefError
from uniref_core.latents import pack_latents
from uniref_core.pipeline import UniRefPipeline, use_vae_tiling


def _latents(pipe, size, seed=1):
    s = pipe.vae_scale
    z = torch.randn(1, pipe.latent_channels, 1, size // s, size // s, generator=torch.Generator().manual_seed(seed))
    return pack_latents(z)


def test_auto_tiles_only_images_above_two_megapixels():
    untiled = [(1024, 1024), (1376, 768), (1328, 1328), (1664, 928), (1448, 1448)]  # defaults, Qwen-Image's sizes
    assert not any(use_vae_tiling("auto", w, h) for w, h in untiled)
    assert all(use_vae_tiling("auto", w, h) for w, h in [(1536, 1536), (2048, 2048), (3072, 1024)])
    assert use_vae_tiling("on", 512, 512) and not use_vae_tiling("off", 4096, 4096)


def test_a_bad_setting_fails_when_set(pipe):
    with pytest.raises(UniRefError, match="vae_tiling is 'yes': use one of auto, on, off"):
        pipe.vae_tiling = "yes"
    assert pipe.vae_tiling == "auto"


@pytest.mark.parametrize("model", ["tiny_model", "tiny_model_4x"])
def test_tiling_on_encodes_and_decodes_in_tiles_of_at_most_256_px(model, request):
    """The tile size is in pixels for any VAE scale: the 4x VAE's tiles cover as many pixels as the 8x VAE's."""
    pipe = UniRefPipeline.from_pretrained(request.getfixturevalue(model))
    seen = {"encoder": [], "decoder": []}  # (height, width) in pixels of each pass through the network
    pipe.c.vae.encoder.register_forward_pre_hook(lambda _, args: seen["encoder"].append(tuple(args[0].shape[-2:])))
    pipe.c.vae.decoder.register_forward_hook(lambda _, args, out: seen["decoder"].append(tuple(out.shape[-2:])))
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))

    def run(setting):
        pipe.vae_tiling = setting
        seen["encoder"].clear(), seen["decoder"].clear()
        pipe.encode([reference], "Picture 1", cfg=1.0, budget=384 * 384, width=64, height=64)
        pipe.decode(_latents(pipe, 384), 384, 384)
        return dict(seen)

    for setting in ("off", "auto"):  # auto: 384² is far below the threshold
        assert run(setting) == {"encoder": [(384, 384)], "decoder": [(384, 384)]}
    tiled = run("on")
    # tiles start every 192 px (at 0 and 192 on each axis), the second one cut at the image's edge
    assert tiled["decoder"] == tiled["encoder"] == [(256, 256), (256, 192), (192, 256), (192, 192)]


def test_tiled_image_stays_close_to_the_untiled_one(pipe):
    pipe.vae_tiling = "off"
    whole = np.asarray(pipe.decode(_latents(pipe, 512), 512, 512)[0]).astype(int)
    pipe.vae_tiling = "on"
    tiled = np.asarray(pipe.decode(_latents(pipe, 512), 512, 512)[0]).astype(int)
    pipe.vae_tiling = "auto"
    diff = np.abs(tiled - whole)
    # Measured on this random 8x VAE at 512²: mean 1.7, max 32 of 255 (its mid-block attention sees the whole image,
    # so tiles differ everywhere, most at the seams); a tile decoded into the wrong place gives a mean of ~13.
    assert 0 < diff.mean() < 3 and diff.max() < 48


def test_cli_vae_tiling_option(tiny_model, tmp_path):
    from uniref_core.__main__ import main

    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(ref)
    images = {}
    for setting in ("off", "on", "auto"):
        out = tmp_path / f"{setting}.png"
        code = main(
            [
                "edit",
                "--model",
                str(tiny_model),
                "--ref",
                str(ref),
                "--prompt",
                "Picture 1 at dusk",
                "--quiet",
                "--budget",
                "64",
                "--width",
                "320",
                "--height",
                "320",
                "--steps",
                "1",
                "--cfg",
                "1",
                "--vae-tiling",
                setting,
                "-o",
                str(out),
            ]
        )
        assert code == 0
        images[setting] = np.asarray(Image.open(out)).astype(int)
    assert np.array_equal(images["auto"], images["off"])  # 320² is below auto's threshold
    diff = np.abs(images["on"] - images["off"])
    assert 0 < diff.mean() < 3
