"""ComfyUI's single-file Qwen-Image(-Edit) diffusion models, read by the engine without ComfyUI: a tiny model
built with ComfyUI's OWN class (``comfy/ldm/qwen_image/model.py``, inside a real host's tree and interpreter),
saved as ComfyUI's files are laid out (no prefix, or all-in-one ``model.diffusion_model.``; the 2511 marker),
loads into diffusers' class and predicts what ComfyUI's model predicts on the same latents, references and
text; bad files are clear errors."""

from pathlib import Path

import pytest
import torch
from comfy_child import our_prediction, run_in_host
from safetensors.torch import load_file, save_file

from uniref_core.comfy_files import load_comfy_transformer
from uniref_core.errors import UniRefError
from uniref_core.pipeline import predict_velocity

COMFY_BUILD_AND_RUN = """
import comfy.ops
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
from comfy_child import comfy_prediction, init_transformer_weights
from safetensors.torch import save_file

torch.manual_seed(args["seed"])
model = QwenImageTransformer2DModel(num_layers=2, attention_head_dim=128, num_attention_heads=2,
                                    joint_attention_dim=64, in_channels=64, out_channels=16,
                                    dtype=torch.float32, operations=comfy.ops.disable_weight_init,
                                    **({"default_ref_method": args["ref_method"]} if args["marker"] else {}))
g = torch.Generator().manual_seed(args["seed"])
dtype = getattr(torch, args["dtype"])
sd = {args["prefix"] + k: v.to(dtype) for k, v in init_transformer_weights(model, g).items()}
if args["marker"]:
    sd[args["prefix"] + "__index_timestep_zero__"] = torch.tensor([])
save_file(sd, args["file"])
comfy_prediction(model.to(dtype).float(), args["sigma"], g, args["io"])
"""


def comfy_model_file(tmp_path, version, *, prefix="", marker=False, dtype="float32", seed=0, sigma=0.7):
    """Build, save and run a tiny model with ComfyUI's class in the host; returns (file, inputs and output)."""
    file, io_file = tmp_path / f"qwen_image_tiny_{dtype}.safetensors", tmp_path / "io.safetensors"
    args = {
        "seed": seed,
        "prefix": prefix,
        "marker": marker,
        "dtype": dtype,
        "sigma": sigma,
        "file": str(file),
        "io": str(io_file),
        "ref_method": "index_timestep_zero" if marker else "index",
    }
    run_in_host(version, COMFY_BUILD_AND_RUN, args)
    return file, load_file(str(io_file))


@pytest.mark.comfy
@pytest.mark.parametrize("version", ["0.30.0", "0.3.75"])
@pytest.mark.parametrize("layout", ["plain", "all_in_one", "2511"])
def test_comfy_single_file_predicts_what_comfyui_predicts(tmp_path, version, layout):
    if layout == "2511" and version == "0.3.75":
        pytest.skip("ComfyUI 0.3.75 has no index_timestep_zero reference method (2511 support came later)")
    prefix = "model.diffusion_model." if layout == "all_in_one" else ""
    file, io = comfy_model_file(tmp_path, version, prefix=prefix, marker=layout == "2511")
    model = load_comfy_transformer(file)
    assert model.config.num_layers == 2 and model.config.num_attention_heads == 2
    assert model.config.zero_cond_t == (layout == "2511")
    got, want = our_prediction(model, io)
    assert want.abs().mean() > 1e-3  # a real output, not zeros that trivially match
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.comfy
def test_a_bf16_file_loads_in_bf16_without_an_fp32_copy(tmp_path):
    file, io = comfy_model_file(tmp_path, "0.30.0", dtype="bfloat16")
    model = load_comfy_transformer(file)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    got, want = our_prediction(model, io)  # ComfyUI ran the same bf16-rounded weights in fp32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert load_comfy_transformer(file, dtype=torch.float32).img_in.weight.dtype == torch.float32


def test_zero_cond_t_can_be_chosen_for_a_file_without_the_marker(tmp_path, tiny_model):
    sd = load_file(str(Path(tiny_model) / "transformer" / "diffusion_pytorch_model.safetensors"))
    file = tmp_path / "model.safetensors"
    save_file(sd, str(file))
    axes = (8, 12, 12)  # the tiny model's 32-wide heads: not Qwen-Image's split, so it must be given
    with pytest.raises(UniRefError, match=r"heads are 32 wide but its rotary split \(16, 56, 56\) sums to 128"):
        load_comfy_transformer(file)
    assert load_comfy_transformer(file, axes_dims_rope=axes).config.zero_cond_t is False
    assert load_comfy_transformer(file, zero_cond_t=True, axes_dims_rope=axes).config.zero_cond_t is True
    # The diffusers folder's own weights, read as a ComfyUI file, are the same model.
    from diffusers import QwenImageTransformer2DModel

    ref = QwenImageTransformer2DModel.from_pretrained(Path(tiny_model) / "transformer")
    mine = load_comfy_transformer(file, axes_dims_rope=axes)
    assert {k: tuple(v.shape) for k, v in mine.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)
    emb = torch.randn(1, 5, ref.config.joint_attention_dim, generator=g)
    with torch.no_grad():
        a = predict_velocity(ref, x, 500.0, [r], emb, None, [[(1, 4, 4), (1, 4, 4)]])
        b = predict_velocity(mine, x, 500.0, [r], emb, None, [[(1, 4, 4), (1, 4, 4)]])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_files_that_are_not_a_qwen_image_model_are_clear_errors(tmp_path):
    vae = tmp_path / "qwen_image_vae.safetensors"
    save_file({"encoder.middle.0.residual.0.gamma": torch.zeros(4)}, str(vae))
    with pytest.raises(
        UniRefError,
        match=r"qwen_image_vae.safetensors is not a Qwen-Image diffusion model.*"
        r"encoder.middle.0.residual.0.gamma",
    ):
        load_comfy_transformer(vae)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(UniRefError, match="is a pickle.*convert it to safetensors"):
        load_comfy_transformer(pickle)
    with pytest.raises(UniRefError, match="does not exist"):
        load_comfy_transformer(tmp_path / "missing.safetensors")
    # Only the embedders of a Qwen-Image file, no blocks: a partial save, refused by name before any model is built.
    part = tmp_path / "qwen_image_part.safetensors"
    save_file({"img_in.weight": torch.zeros(8, 64), "txt_norm.weight": torch.zeros(16)}, str(part))
    with pytest.raises(
        UniRefError,
        match=r"qwen_image_part.safetensors has no txt_in.weight, proj_out.weight, .*"
        r"not a whole Qwen-Image diffusion model",
    ):
        load_comfy_transformer(part)
