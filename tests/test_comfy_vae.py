"""ComfyUI's single-file Qwen-Image VAE (``models/vae/qwen_image_vae.safetensors``, Wan 2.1 keys), read by the
engine without ComfyUI: a tiny VAE built with ComfyUI's OWN class (``comfy/ldm/wan/vae.py``, the one
``comfy/sd.py`` builds for such a file) in a real host, saved as ComfyUI's files are laid out, loads into
diffusers' ``AutoencoderKLQwenImage`` and encodes and decodes as ComfyUI's does; bad files are clear errors."""

import pytest
import torch
from comfy_child import comfy_vae_file
from safetensors.torch import save_file

from uniref_core.comfy_files import load_comfy_vae
from uniref_core.errors import UniRefError


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
