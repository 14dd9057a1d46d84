"""Block offload (for GPUs smaller than the model): the transformer's blocks and the text encoder's layers rest on
the offload device and visit the execution device only while they run. The edit it gives is the edit without it,
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
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8))]  # fmt: skip


def _edit(pipe):
    out = pipe.edit(_refs(), "Put Picture 1 next to Picture 2", seed=3, steps=3, cfg=2.0, budget=64 * 64,
                    width=64, height=64)  # fmt: skip
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
    assert np.array_equal(with_lora, _edit(plain)) and not np.array_equal(with_lora, _edit(UniRefPipeline.from_pretrained(tiny_model)))
    assert {p.device.type for p in offloaded.c.transformer.parameters()} == {"cpu"}


def test_block_offload_twice_is_a_clear_error(tiny_model):
    pipe = UniRefPipeline.from_pretrained(tiny_model)
    pipe.enable_block_offload("cpu")
    with pytest.raises(UniRefError, match="already enabled"):
        pipe.enable_block_offload("cpu")


def test_cli_offload_blocks_writes_the_same_image(tiny_model, tmp_path):
    from uniref_core.__main__ import main

    refs = []
    for i, im in enumerate(_refs()):
        refs += ["--ref", str(tmp_path / f"ref{i}.png")]
        im.save(refs[-1])
    outs = []
    for offload in ("none", "blocks"):
        outs.append(tmp_path / f"{offload}.png")
        code = main(["edit", "--model", str(tiny_model), *refs, "--prompt", "Put Picture 1 next to Picture 2", "--quiet",
                     "--budget", "64", "--width", "64", "--height", "64", "--steps", "2", "--offload", offload,
                     "-o", str(outs[-1])])  # fmt: skip
        assert code == 0
    assert np.array_equal(np.asarray(Image.open(outs[0])), np.asarray(Image.open(outs[1])))
