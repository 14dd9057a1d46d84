"""fp8 single-file Qwen-Image transformers, as ComfyUI's fp8 files are laid out (the older ``scaled_fp8`` marker
with ``.scale_weight``, the newer ``.weight_scale`` + ``.comfy_quant``, and plain fp8 with no scale): they load
with their linear layers kept in 8 bits and predict what ComfyUI predicts when it loads the same file with its
own quantised-ops path (``comfy.utils.convert_old_quants`` + ``comfy.ops.mixed_precision_ops``, emulated on CPU)."""

import pytest
import torch
from comfy_child import last_json, our_prediction, quantise_fp8, run_in_host
from safetensors.torch import load_file, save_file

from uniref_core.comfy_files import load_comfy_transformer
from uniref_core.errors import UniRefError
from uniref_core.fp8 import FP8Linear

COMFY_FP8 = """
import comfy.ops
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
from comfy_child import QUANT, comfy_fp8_load, comfy_prediction, init_transformer_weights, quantise_fp8
from safetensors.torch import save_file

kw = dict(num_layers=2, attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64, in_channels=64,
          out_channels=16, dtype=torch.float32)
torch.manual_seed(0)
model = QwenImageTransformer2DModel(**kw, operations=comfy.ops.disable_weight_init)
g = torch.Generator().manual_seed(args["seed"])
sd = init_transformer_weights(model, g)
blocks = [k for k, w in sd.items() if k.startswith("transformer_blocks.") and k.endswith(".weight") and w.ndim == 2]
quantised = quantise_fp8(sd, blocks, args["layout"], scale_input=True)
save_file(sd, args["file"])

# ComfyUI's own load of that file: old quants converted, quantised layers through its mixed-precision ops.
loaded, ops = comfy_fp8_load(args["file"])
if args["layout"] == "plain":  # ComfyUI casts plain fp8 weights at compute; as a quantised layer with scale 1
    for k in [k for k, v in loaded.items() if v.dtype == torch.float8_e4m3fn]:
        loaded[k[: -len(".weight")] + ".comfy_quant"] = QUANT
        loaded[k[: -len(".weight")] + ".weight_scale"] = torch.tensor(1.0)
ref = QwenImageTransformer2DModel(**kw, operations=ops)
missing, unexpected = ref.load_state_dict(loaded, strict=False)
assert not [m for m in missing if "pe_embedder" not in m], missing
comfy_prediction(ref, 0.7, g, args["io"])
print(json.dumps({"quantised": quantised}))
"""


def comfy_fp8_file(tmp_path, layout, version="0.30.0", seed=0):
    file, io_file = tmp_path / f"qwen_image_tiny_fp8_{layout}.safetensors", tmp_path / "io.safetensors"
    args = {"seed": seed, "layout": layout, "file": str(file), "io": str(io_file)}
    proc = run_in_host(version, COMFY_FP8, args)
    return file, load_file(str(io_file)), last_json(proc)["quantised"]


@pytest.mark.comfy
@pytest.mark.parametrize("layout", ["old", "new", "plain"])
def test_fp8_file_stays_8_bit_and_predicts_what_comfyui_predicts(tmp_path, layout):
    """0.30.0 only: 0.3.75 has neither convert_old_quants nor the comfy_quant layer format."""
    file, io, quantised = comfy_fp8_file(tmp_path, layout)
    model = load_comfy_transformer(file, dtype=torch.float32)
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == quantised > 0
    assert all(m.weight_fp8.dtype == torch.uint8 and m.fp8_dtype == torch.float8_e4m3fn for m in fp8)
    got, want = our_prediction(model, io)
    assert want.abs().mean() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # A dtype cast (what a bf16 pipeline does) leaves the 8-bit weights and their fp32 scales alone.
    scales = [m.weight_scale.clone() for m in fp8]
    model.to(torch.bfloat16)
    assert all(m.weight_fp8.dtype == torch.uint8 for m in fp8)
    assert all(torch.equal(m.weight_scale, s) for m, s in zip(fp8, scales))


def test_other_quantised_formats_are_refused_by_name(tmp_path):
    sd = {
        "txt_norm.weight": torch.ones(4),
        "img_in.weight": torch.zeros(4, 4),
        "transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4, dtype=torch.uint8),
        "transformer_blocks.0.attn.to_q.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8),
    }
    file = tmp_path / "qwen_image_nvfp4.safetensors"
    save_file(sd, str(file))
    with pytest.raises(UniRefError, match="qwen_image_nvfp4.safetensors is quantised as nvfp4.*bf16 or fp8"):
        load_comfy_transformer(file)


def _fp8_and_dense(tiny_model, tmp_path):
    """The tiny model's transformer saved with every block's linear weight in fp8 (as an fp8 ComfyUI file), loaded
    by the engine, and the same model with those weights dequantised into ordinary float layers."""
    from diffusers import QwenImageTransformer2DModel

    dense = QwenImageTransformer2DModel.from_pretrained(f"{tiny_model}/transformer")
    sd = {k: v.contiguous() for k, v in dense.state_dict().items()}
    blocks = [k for k in sd if k.startswith("transformer_blocks.") and k.endswith(".weight") and sd[k].ndim == 2]
    quantise_fp8(sd, blocks, "new")
    file = tmp_path / "tiny_fp8.safetensors"
    save_file(sd, str(file))
    model = load_comfy_transformer(file, axes_dims_rope=dense.config.axes_dims_rope)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, FP8Linear):
                dense.get_submodule(name).weight.copy_(m.dequantized())
    return model, dense


def _predict(model, seed=0):
    from uniref_core.latents import pack_latents
    from uniref_core.pipeline import predict_velocity

    g = torch.Generator().manual_seed(seed)
    c = model.config.in_channels // 4
    x, ref = (
        pack_latents(torch.randn(1, c, 1, 8, 8, generator=g)),
        pack_latents(torch.randn(1, c, 1, 4, 8, generator=g)),
    )
    context = torch.randn(1, 7, model.config.joint_attention_dim, generator=g)
    with torch.no_grad():
        return predict_velocity(model, x, 700.0, [ref], context, None, [[(1, 4, 4), (1, 2, 4)]])


def test_loras_on_an_fp8_model_predict_what_they_do_merged_into_its_float_weights(tmp_path, tiny_model):
    """The lightning-LoRA-on-fp8 case: LoRAs (two at once, at their strengths) on an fp8 model give what the same
    LoRAs merged into the dequantised float model give; the 8-bit weights are never touched, no float copy of a
    layer is made, and removing the LoRAs gives the model's own prediction back bit for bit."""
    from conftest import random_lora, write_lora

    from uniref_core.lora import LoraPatcher, read_lora

    model, dense = _fp8_and_dense(tiny_model, tmp_path)
    files = []
    for seed, layout in ((0, "comfy"), (1, "kohya")):
        files.append(tmp_path / f"lora{seed}.safetensors")
        write_lora(random_lora(dense, seed=seed), files[-1], layout)
    loras = [(read_lora(files[0]), 0.8), (read_lora(files[1]), 0.5)]
    before = _predict(model)
    torch.testing.assert_close(before, _predict(dense), rtol=1e-4, atol=1e-5)  # the same model, two storages
    bits = {n: m.weight_fp8.clone() for n, m in model.named_modules() if isinstance(m, FP8Linear)}

    patcher = LoraPatcher(model)
    assert patcher.apply(loras) > 0
    dense_patcher = LoraPatcher(dense)
    dense_patcher.apply(loras)
    got, want = _predict(model), _predict(dense)
    assert (want - before).abs().mean() > 1e-2  # the LoRAs change the prediction visibly
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            assert torch.equal(m.weight_fp8, bits[name]) and not hasattr(m, "weight")
            assert m.lora_down is None or m.lora_down.shape[0] == 8  # two rank-4 LoRAs: factors only
    assert not any("lora" in k for k in model.state_dict())  # a saved model never carries the LoRA

    patcher.apply([(loras[0][0], 0.8)])  # one LoRA taken out of the graph
    dense_patcher.apply([(loras[0][0], 0.8)])
    torch.testing.assert_close(_predict(model), _predict(dense), rtol=1e-4, atol=1e-5)
    patcher.apply([])
    assert torch.equal(_predict(model), before)
