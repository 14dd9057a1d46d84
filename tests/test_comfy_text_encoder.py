"""ComfyUI's single-file Qwen2.5-VL text encoder (``models/text_encoders/qwen_2.5_vl_7b.safetensors``: flat
``model.layers.*`` / ``visual.*`` keys), read by the engine without ComfyUI: a tiny encoder built with ComfyUI's
OWN classes (``comfy/text_encoders/llama.py`` ``Qwen25_7BVLI`` and its ``qwen_vl`` vision tower) in a real host,
saved as ComfyUI saves it, loads into transformers' ``Qwen2_5_VLForConditionalGeneration`` and gives ComfyUI's
hidden states for text and ComfyUI's vision-tower output for image patches."""

import pytest
import torch
from comfy_child import last_json, run_in_host
from safetensors.torch import load_file, save_file

from uniref_core.comfy_files import load_comfy_text_encoder
from uniref_core.errors import UniRefError

COMFY_TE = """
import comfy.ops
import host_shims.uniref_test_tiny_qwen  # ComfyUI's 7B vision tower at a tiny width and depth; text sizes below
from comfy.text_encoders import llama
from comfy_child import comfy_fp8_load, init_weights, quantise_fp8
from safetensors.torch import save_file

config = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1}
model = llama.Qwen25_7BVLI(config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
g = torch.Generator().manual_seed(args["seed"])
dtype = getattr(torch, args["dtype"])
sd = {k: v.to(dtype) for k, v in init_weights(model, g).items()}
model = model.to(dtype).float()
layout = args.get("layout")
if layout:  # an fp8 file as ComfyUI's *_fp8_scaled text encoders are laid out: every linear weight in 8 bits
    linears = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2 and "embed_tokens" not in k]
    print(json.dumps({"quantised": quantise_fp8(sd, linears, layout)}))
save_file(sd, args["file"])
if layout:  # ComfyUI's own load of that file, its quantised layers through its mixed-precision ops
    loaded, ops = comfy_fp8_load(args["file"])
    model = llama.Qwen25_7BVLI(config, dtype=torch.float32, device="cpu", operations=ops)
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
tokens = torch.randint(0, 1024, (1, 11), generator=g)
patches = torch.randn((1 * 4 * 6, 3 * 2 * 14 * 14), generator=g)
grid = torch.tensor([[1, 4, 6]])
with torch.no_grad():
    hidden = model(tokens)[0]
    vision = model.visual(patches, grid)
save_file({"tokens": tokens, "hidden": hidden.contiguous(), "patches": patches, "grid": grid,
           "vision": vision.contiguous()}, args["io"])
"""


def comfy_te_file(tmp_path, version, *, dtype="float32", seed=0, layout=None):
    name = f"qwen_2.5_vl_tiny_fp8_scaled_{layout}" if layout else f"qwen_2.5_vl_tiny_{dtype}"
    file, io_file = tmp_path / f"{name}.safetensors", tmp_path / "io.safetensors"
    args = {"seed": seed, "dtype": dtype, "file": str(file), "io": str(io_file), "layout": layout}
    proc = run_in_host(version, COMFY_TE, args)
    io = load_file(str(io_file))
    if layout:
        io["quantised"] = last_json(proc)["quantised"]
    return file, io


def our_outputs(model, io):
    with torch.no_grad():
        hidden = model(input_ids=io["tokens"], output_hidden_states=True).hidden_states[-1]
        vision = model.model.visual(io["patches"], grid_thw=io["grid"])
    vision = getattr(vision, "pooler_output", vision)  # transformers 5 returns an output object
    return hidden, vision


@pytest.mark.comfy
@pytest.mark.parametrize("version", ["0.30.0", "0.3.75"])
def test_comfy_text_encoder_file_gives_comfyuis_hidden_states(tmp_path, version):
    file, io = comfy_te_file(tmp_path, version)
    model = load_comfy_text_encoder(file)
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.num_attention_heads == 2
    assert model.config.vision_config.depth == 2
    hidden, vision = our_outputs(model, io)
    assert io["hidden"].std() > 1e-2 and io["vision"].std() > 1e-2  # real activations, not zeros
    torch.testing.assert_close(hidden, io["hidden"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vision, io["vision"], rtol=1e-4, atol=1e-4)


@pytest.mark.comfy
def test_a_bf16_text_encoder_file_stays_bf16(tmp_path):
    file, io = comfy_te_file(tmp_path, "0.30.0", dtype="bfloat16")
    model = load_comfy_text_encoder(file)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    hidden, _ = our_outputs(model.float(), io)  # ComfyUI ran the same bf16-rounded weights in fp32
    torch.testing.assert_close(hidden, io["hidden"], rtol=1e-3, atol=1e-3)


@pytest.mark.comfy
@pytest.mark.parametrize("layout", ["old", "new"])
def test_fp8_scaled_text_encoder_stays_8_bit_and_gives_comfyuis_hidden_states(tmp_path, layout):
    """qwen_2.5_vl_7b_fp8_scaled.safetensors, the text encoder most ComfyUI installs have, in both fp8 layouts:
    its linear layers stay 8-bit and the hidden states equal ComfyUI's from the same file through its quantised
    ops (0.30.0 only: 0.3.75 has neither convert_old_quants nor the comfy_quant format)."""
    from uniref_core.fp8 import FP8Linear

    file, io = comfy_te_file(tmp_path, "0.30.0", layout=layout)
    model = load_comfy_text_encoder(file, dtype=torch.float32)
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == io["quantised"] > 0 and all(m.weight_fp8.dtype == torch.uint8 for m in fp8)
    hidden, vision = our_outputs(model, io)
    assert io["hidden"].std() > 1e-2 and io["vision"].std() > 1e-2
    torch.testing.assert_close(hidden, io["hidden"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vision, io["vision"], rtol=1e-4, atol=1e-4)


def test_files_that_are_not_a_qwen25_vl_text_encoder_are_clear_errors(tmp_path):
    vae = tmp_path / "qwen_image_vae.safetensors"
    save_file({"encoder.middle.0.residual.0.gamma": torch.zeros(4)}, str(vae))
    with pytest.raises(
        UniRefError, match=r"qwen_image_vae.safetensors is not a Qwen2.5-VL text encoder.*models/text_encoders/"
    ):
        load_comfy_text_encoder(vae)
    fp8 = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    save_file(
        {
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
            "model.embed_tokens.weight": torch.zeros(4, 4),
            "model.norm.weight": torch.zeros(4),
            "model.norm.scale_weight": torch.ones(()),
        },
        str(fp8),
    )
    with pytest.raises(
        UniRefError,
        match="qwen_2.5_vl_7b_fp8_scaled.safetensors: 'model.norm' has an fp8 scale but its weight is not fp8",
    ):
        load_comfy_text_encoder(fp8)
    pickle = tmp_path / "text_encoder.bin"
    pickle.write_bytes(b"x")
    with pytest.raises(UniRefError, match="is a pickle.*convert it to safetensors"):
        load_comfy_text_encoder(pickle)
