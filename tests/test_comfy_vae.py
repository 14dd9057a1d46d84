"""ComfyUI's single-file Qwen-Image VAE (``models/vae/qwen_image_vae.safetensors``, Wan 2.1 keys), read by the
engine without ComfyUI: a tiny VAE built with ComfyUI's OWN class (``comfy/ldm/wan/vae.py``, the one
``comfy/sd.py`` builds for such a file) in a real host, saved as ComfyUI's files are laid out, loads into
diffusers' ``AutoencoderKLQwenImage`` and encodes and decodes as ComfyUI's does; bad files are clear errors."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from uniref_core.comfy_files import load_comfy_vae
from uniref_core.errors import UniRefError

COMFY_VAE = """
import json, sys
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
import torch
from comfy.ldm.wan.vae import WanVAE
from comfy import latent_formats
from safetensors.torch import save_file

args = json.loads(ARGS)
# What comfy/sd.py builds for a Wan 2.1 (Qwen-Image) VAE file, at a tiny width.
vae = WanVAE(dim=args["dim"], z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0)
g = torch.Generator().manual_seed(args["seed"])
with torch.no_grad():
    for name, p in vae.named_parameters():  # comfy.ops.disable_weight_init leaves them uninitialised
        if "gamma" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
sd = {args["prefix"] + k: v.to(getattr(torch, args["dtype"])).contiguous() for k, v in vae.state_dict().items()}
save_file(sd, args["file"])
vae = vae.to(getattr(torch, args["dtype"])).float()
image = torch.rand((1, 3, 1, 48, 32), generator=g) * 2 - 1
with torch.no_grad():
    mu = vae.encode(image)
    out = vae.decode(mu)
fmt = latent_formats.Wan21()
save_file({"image": image, "mu": mu.contiguous(), "out": out.contiguous(),
           "latents_mean": fmt.latents_mean.flatten().contiguous(),
           "latents_std": fmt.latents_std.flatten().contiguous()},
          args["io"])
"""


def comfy_vae_file(tmp_path, version, *, prefix="", dtype="float32", dim=8, seed=0):
    from comfyhost import comfy_hosts

    host = comfy_hosts.ensure_host(version)
    file, io_file = tmp_path / f"qwen_image_vae_{dtype}.safetensors", tmp_path / "io.safetensors"
    args = {"seed": seed, "prefix": prefix, "dtype": dtype, "dim": dim, "file": str(file), "io": str(io_file)}
    script = COMFY_VAE.replace("ARGS", repr(json.dumps(args)))
    proc = subprocess.run(
        [str(host.python), "-c", script],
        cwd=host.comfy_dir,
        capture_output=True,
        text=True,
        timeout=300,
        env=comfy_hosts.host_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return file, load_file(str(io_file))


@pytest.mark.comfy
@pytest.mark.parametrize("version", ["0.30.0", "0.3.75"])
@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_comfy_vae_file_encodes_and_decodes_as_comfyui_does(tmp_path, version, prefix):
    file, io = comfy_vae_file(tmp_path, version, prefix=prefix)
    vae = load_comfy_vae(file)
    assert vae.config.base_dim == 8 and vae.config.z_dim == 16
    with torch.no_grad():
        mu = vae.encode(io["image"]).latent_dist.mode()
        out = vae.decode(io["mu"]).sample
    assert io["mu"].abs().mean() > 1e-2 and io["out"].std() > 1e-2  # real activations, not zeros
    torch.testing.assert_close(mu, io["mu"], rtol=1e-4, atol=1e-5)
    # diffusers clamps the decoded image to [-1, 1]; ComfyUI clamps after its decode (VAE.process_output).
    torch.testing.assert_close(out, io["out"].clamp(-1, 1), rtol=1e-4, atol=1e-5)
    # The latent normalisation the engine applies is the one ComfyUI uses for this VAE.
    torch.testing.assert_close(torch.tensor(vae.config.latents_mean), io["latents_mean"])
    torch.testing.assert_close(torch.tensor(vae.config.latents_std), io["latents_std"])


@pytest.mark.comfy
def test_a_bf16_vae_file_stays_bf16(tmp_path):
    file, io = comfy_vae_file(tmp_path, "0.30.0", dtype="bfloat16")
    vae = load_comfy_vae(file)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        mu = vae.float().encode(io["image"]).latent_dist.mode()
    torch.testing.assert_close(mu, io["mu"], rtol=1e-3, atol=1e-4)  # ComfyUI ran the same rounded weights in fp32


def test_files_that_are_not_a_qwen_image_vae_are_clear_errors(tmp_path):
    transformer = tmp_path / "qwen_image_edit_2511_bf16.safetensors"
    save_file({"txt_norm.weight": torch.zeros(4), "img_in.weight": torch.zeros(4, 4)}, str(transformer))
    with pytest.raises(
        UniRefError, match=r"qwen_image_edit_2511_bf16.safetensors is not a Qwen-Image VAE.*models/vae/"
    ):
        load_comfy_vae(transformer)
    wan22 = tmp_path / "wan2.2_vae.safetensors"
    save_file(
        {
            "decoder.middle.0.residual.0.gamma": torch.zeros(4, 1, 1, 1),
            "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(4),
        },
        str(wan22),
    )
    with pytest.raises(UniRefError, match="Wan 2.2 VAE.*qwen_image_vae.safetensors"):
        load_comfy_vae(wan22)
    partial = tmp_path / "partial_vae.safetensors"
    save_file(
        {
            "decoder.middle.0.residual.0.gamma": torch.zeros(8, 1, 1, 1),
            "decoder.head.0.gamma": torch.ones(8, 1, 1, 1),
            "decoder.conv1.weight": torch.zeros(32, 16, 3, 3, 3),
        },
        str(partial),
    )
    with pytest.raises(UniRefError, match="does not match the Qwen-Image VAE layout.*missing"):
        load_comfy_vae(partial)
    pickle = tmp_path / "vae.pt"
    pickle.write_bytes(b"x")
    with pytest.raises(UniRefError, match="is a pickle.*convert it to safetensors"):
        load_comfy_vae(pickle)
