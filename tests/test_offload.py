"""Offload for GPUs smaller than the model. Block offload: the transformer's blocks and the text encoder's layers
rest on the offload device and visit the execution device only while they run. Model offload: one of the two
networks on the execution device at a time. The edit it gives is the edit without it,
LoRAs included; the weights sit on the offload device between runs.

On a CPU-only machine the execution and offload devices are both the CPU, so these tests prove the hooks and the
engine's device plumbing (inputs made on the execution device, not where the weights rest), not the GPU memory
saving; `bench/` has no GPU figure for it yet."""

import numpy as np
import pytest
import torch
from PIL import Image

from uniref_core.errors import UniRefError
from uniref_core.pipeline import UniRefPipeline


def _refs():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)),
    ]


def _edit(pipe):
    out = pipe.edit(
        _refs(), "Put Picture 1 next to Picture 2", seed=3, steps=3, cfg=2.0, budget=64 * 64, width=64, height=64
    )
    return np.asarray(out.images[0])


def test_block_offload_gives_the_same_edit_with_and_without_a_lora(tiny_model, tmp_path):
    from conftest import random_lora, write_lora
    from diffusers.hooks import HookRegistry

    plain = UniRefPipeline.from_pretrained(tiny_model)
    offloaded = UniRefPipeline.from_pretrained(tiny_model)
    offloaded.enable_block_offload("cpu")
    assert offloaded.offload == "blocks"
    blocks = offloaded.c.transformer.transformer_blocks
    assert all(HookRegistry.check_if_exists_or_initialize(b).get_hook("group_offloading") for b in blocks)
    assert np.array_equal(_edit(offloaded), _edit(plain))  # cfg 2: the negative prompt runs through it too

    lora = tmp_path / "lora.safetensors"
    write_lora(random_lora(plain.c.transformer), lora, "comfy")
    plain.set_loras([(lora, 0.7)])
    offloaded.set_loras([(lora, 0.7)])
    with_lora = _edit(offloaded)
    assert np.array_equal(with_lora, _edit(plain)) and not np.array_equal(
        with_lora, _edit(UniRefPipeline.from_pretrained(tiny_model))
    )
    assert {p.device.type for p in offloaded.c.transformer.parameters()} == {"cpu"}


def test_block_offload_twice_is_a_clear_error(tiny_model):
    pipe = UniRefPipeline.from_pretrained(tiny_model)
    pipe.enable_block_offload("cpu")
    with pytest.raises(UniRefError, match="already enabled"):
        pipe.enable_block_offload("cpu")


def test_model_offload_moves_one_network_at_a_time_and_gives_the_same_edit(tiny_model, tmp_path):
    """Each network is moved onto the execution device before it runs, the one there first moved off; the
    transformer stays there for the whole denoising loop (one move per edit, not per step) and leaves before the
    VAE decodes, so the decode has the device to itself."""
    from conftest import random_lora, write_lora

    plain = UniRefPipeline.from_pretrained(tiny_model)
    pipe = UniRefPipeline.from_pretrained(tiny_model)
    execution = torch.device("cpu", 0)  # the same memory as "cpu" under another name, so each move's direction shows
    pipe.enable_model_offload(execution, offload_device="cpu")
    events = []
    for name in ("text_encoder", "transformer"):
        module = getattr(pipe.c, name)
        original_to = module.to

        def logged_to(device, *args, _name=name, _to=original_to, **kwargs):
            events.append(("onto the device" if torch.device(device) == execution else "off the device", _name))
            return _to(device, *args, **kwargs)

        module.to = logged_to
        module.register_forward_pre_hook(lambda *_, _name=name: events.append(("run", _name)))
    pipe.c.vae.decoder.register_forward_pre_hook(lambda *_: events.append(("run", "VAE decoder")))
    first, second = _edit(pipe), _edit(pipe)  # the text encoder comes back for the second edit
    assert np.array_equal(first, _edit(plain)) and np.array_equal(second, first)

    one_edit = [
        ("onto the device", "text_encoder"),
        *[("run", "text_encoder")] * 2,  # positive + negative prompt
        ("off the device", "text_encoder"),
        ("onto the device", "transformer"),
        *[("run", "transformer")] * 3 * 2,  # 3 steps × (positive + negative), all on one onload
        ("off the device", "transformer"),
        ("run", "VAE decoder"),
    ]
    assert events == one_edit * 2

    lora = tmp_path / "lora.safetensors"
    write_lora(random_lora(plain.c.transformer), lora, "comfy")
    plain.set_loras([(lora, 0.7)])
    pipe.set_loras([(lora, 0.7)])
    assert np.array_equal(_edit(pipe), _edit(plain))
    with pytest.raises(UniRefError, match="model offload is already enabled"):
        pipe.enable_block_offload("cpu")


@pytest.mark.parametrize("offload", ["blocks", "model"])
def test_cli_offload_writes_the_same_image(tiny_model, tmp_path, offload):
    from uniref_core.__main__ import main

    refs = []
    for i, im in enumerate(_refs()):
        refs += ["--ref", str(tmp_path / f"ref{i}.png")]
        im.save(refs[-1])
    outs = []
    for mode in ("none", offload):
        outs.append(tmp_path / f"{mode}.png")
        code = main(
            [
                "edit",
                "--model",
                str(tiny_model),
                *refs,
                "--prompt",
                "Put Picture 1 next to Picture 2",
                "--quiet",
                "--budget",
                "64",
                "--width",
                "64",
                "--height",
                "64",
                "--steps",
                "2",
                "--offload",
                mode,
                "-o",
                str(outs[-1]),
            ]
        )
        assert code == 0
    assert np.array_equal(np.asarray(Image.open(outs[0])), np.asarray(Image.open(outs[1])))
