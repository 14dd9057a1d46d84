"""Model folders as users have them: published layout, sharded transformers, and broken downloads."""

import gc
import json
import shutil
import weakref

import numpy as np
import pytest
import torch
from conftest import make_refs
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import save_file

from uniref_core import UniRefError, UniRefPipeline
from uniref_core.model import check_model_folder


@pytest.fixture
def broken(tiny_model, tmp_path):
    """A fresh copy of the tiny model folder to damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def test_sharded_transformer_loads_and_gives_the_same_image(tiny_model, broken):
    t = QwenImageTransformer2DModel.from_pretrained(tiny_model / "transformer")
    shutil.rmtree(broken / "transformer")
    t.save_pretrained(broken / "transformer", max_shard_size="1MB", safe_serialization=True)
    files = sorted(p.name for p in (broken / "transformer").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3
    refs = make_refs([(96, 64)])
    opts = dict(cfg=1.0, steps=2, budget=64 * 64, width=64, height=64)
    whole, sharded = UniRefPipeline.from_pretrained(tiny_model), UniRefPipeline.from_pretrained(broken)
    w_sd, s_sd = whole.c.transformer.state_dict(), sharded.c.transformer.state_dict()
    assert w_sd.keys() == s_sd.keys() and all(torch.equal(w_sd[k], s_sd[k]) for k in w_sd)
    a = np.asarray(whole.edit(refs, "make it red", **opts).images[0]).astype(int)
    b = np.asarray(sharded.edit(refs, "make it red", **opts).images[0]).astype(int)
    # Same weights, same image. Shards are memory-mapped at unaligned addresses, so some CPUs
    # (seen on AMD EPYC) sum in another order: at most one 8-bit level on a rare pixel.
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def test_missing_component_is_named(broken):
    shutil.rmtree(broken / "vae")
    with pytest.raises(UniRefError, match="missing the 'vae' component"):
        UniRefPipeline.from_pretrained(broken)


def test_missing_shard_is_named(tiny_model, broken):
    t = QwenImageTransformer2DModel.from_pretrained(tiny_model / "transformer")
    shutil.rmtree(broken / "transformer")
    t.save_pretrained(broken / "transformer", max_shard_size="1MB", safe_serialization=True)
    shard = sorted((broken / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(UniRefError, match=f"'transformer' is incomplete: shard\\(s\\) {shard.name}"):
        check_model_folder(broken)


def test_pickle_weights_are_refused(broken):
    weights = broken / "text_encoder" / "model.safetensors"
    weights.unlink()
    torch.save({"x": torch.zeros(1)}, broken / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(UniRefError, match="'text_encoder' has only pickle weights.*safetensors"):
        UniRefPipeline.from_pretrained(broken)


def test_other_architecture_is_named(broken):
    index = json.loads((broken / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UniRefError, match="holds a StableDiffusionXLPipeline model"):
        UniRefPipeline.from_pretrained(broken)


def test_wrong_component_class_is_named(broken):
    cfg = json.loads((broken / "vae" / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKL"
    (broken / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UniRefError, match="'vae' is a AutoencoderKL, expected AutoencoderKLQwenImage"):
        UniRefPipeline.from_pretrained(broken)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UniRefError, match="model folder not found"):
        UniRefPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(UniRefError, match="no model_index.json"):
        UniRefPipeline.from_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, f)
    with pytest.raises(UniRefError, match="is a file"):
        UniRefPipeline.from_pretrained(f)


def test_corrupt_weights_are_a_clear_error(broken):
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UniRefError, match="could not be loaded"):
        UniRefPipeline.from_pretrained(broken)


def test_a_model_that_is_dropped_leaves_nothing_behind_and_a_reload_gives_the_same_image(tiny_model):
    """ComfyUI loads the model again after each "Free model and node cache": the old one must go entirely (diffusers
    keeps its rotary caches on the class, keyed by the module, which held every model ever loaded)."""
    refs = make_refs([(96, 64), (64, 96)])
    opts = dict(cfg=1.0, steps=1, budget=64 * 64, width=64, height=48)
    first = UniRefPipeline.from_pretrained(tiny_model)
    image = np.asarray(first.edit(refs, "make it red", **opts).images[0])
    gone = weakref.ref(first.c.transformer.pos_embed)
    del first
    gc.collect()
    assert gone() is None, "the rotary embedding of a dropped model is still referenced"
    again = np.asarray(UniRefPipeline.from_pretrained(tiny_model).edit(refs, "make it red", **opts).images[0])
    assert np.array_equal(image, again)
