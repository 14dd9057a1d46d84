"""ComfyUI's single-file checkpoints of the Qwen-Image-Edit family, read without ComfyUI.

ComfyUI ships a Qwen-Image(-Edit) diffusion model as one ``.safetensors`` file in ``models/diffusion_models/``
(e.g. ``qwen_image_edit_2511_bf16.safetensors``). Its keys are diffusers' own module names (ComfyUI's
``comfy/ldm/qwen_image/model.py`` mirrors diffusers' ``QwenImageTransformer2DModel``), with no prefix, or with
``model.diffusion_model.`` in all-in-one checkpoints. ComfyUI's ``model_detection.py`` recognises the family by
``txt_norm.weight``, reads ``in_channels`` from ``img_in`` and the depth by counting ``transformer_blocks.N``,
and a 2511 file carries a 0-d ``__index_timestep_zero__`` tensor: references modulated at t = 0, which is
diffusers' ``zero_cond_t``. The other sizes ComfyUI takes as its class defaults; here they are read from the
weights' shapes, so a smaller model of the same layout loads too (head size from ``attn.norm_q``, width from
``img_in``, text width from ``txt_in``).

The weights are loaded straight into a model built on the meta device, in the file's dtype or the one asked
for, so no fp32 copy of a bf16 file is ever made.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import UniRefError

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
ZERO_COND_MARKER = "__index_timestep_zero__"
#: Qwen-Image's rotary axes (frame, height, width) for its 128-wide heads.
QWEN_AXES = (16, 56, 56)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def _keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UniRefError(
            f"{path} is a pickle ({path.suffix}), which can run code when loaded and is refused: convert it to "
            "safetensors once, in an environment you trust (torch.load, then safetensors.torch.save_file)"
        )
    if not path.is_file():
        raise UniRefError(f"{path} does not exist: give the path of a .safetensors diffusion model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise UniRefError(f"{path} is not a readable safetensors file ({e})") from None


def transformer_prefix(keys) -> str | None:
    """The prefix under which a Qwen-Image transformer's keys sit in a file (``""`` for none), or None when the
    file holds no Qwen-Image transformer (ComfyUI's test: ``txt_norm.weight`` and ``img_in.weight``)."""
    keys = set(keys)
    for prefix in ("", *PREFIXES):
        if f"{prefix}txt_norm.weight" in keys and f"{prefix}img_in.weight" in keys:
            return prefix
    return None


def transformer_config(shapes: dict[str, tuple], zero_cond_t: bool, axes_dims_rope=None) -> dict:
    """diffusers ``QwenImageTransformer2DModel`` config from the (unprefixed) weights' shapes. The rotary split of
    a head is not in the weights: Qwen-Image's (16, 56, 56) for its 128-wide heads, as ComfyUI assumes; a model
    with other heads must say its own (``axes_dims_rope``)."""
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    if inner % head_dim:
        raise UniRefError(f"transformer width {inner} is not a multiple of its head size {head_dim}")
    patch = 2
    axes = tuple(axes_dims_rope) if axes_dims_rope else QWEN_AXES
    if sum(axes) != head_dim:
        raise UniRefError(f"the model's heads are {head_dim} wide but its rotary split {axes} sums to {sum(axes)}: "
                          "give the split it was trained with (axes_dims_rope, three even numbers summing to the head size)")
    return {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": shapes["proj_out.weight"][0] // (patch * patch),
        "num_layers": max(blocks) + 1,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "guidance_embeds": False,
        "axes_dims_rope": list(axes),
        "zero_cond_t": zero_cond_t,
    }


def load_comfy_transformer(path, dtype: torch.dtype | None = None, device="cpu", zero_cond_t: bool | None = None,
                           axes_dims_rope=None):
    """A ComfyUI single-file Qwen-Image(-Edit) diffusion model as diffusers' ``QwenImageTransformer2DModel``.

    ``zero_cond_t``: None reads it from the file (the 2511 marker); True/False overrides it for files without
    the marker (a 2511 fine-tune saved by a tool that drops it)."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open

    path = Path(path)
    keys = _keys(path)
    prefix = transformer_prefix(keys)
    if prefix is None:
        raise UniRefError(
            f"{path.name} is not a Qwen-Image diffusion model: it has no 'txt_norm.weight' / 'img_in.weight' (first "
            f"keys: {', '.join(keys[:3])}). Pick a file like qwen_image_edit_2511_bf16.safetensors from "
            "models/diffusion_models/"
        )
    state: dict[str, torch.Tensor] = {}
    marker = False
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in keys:
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if name == ZERO_COND_MARKER:
                marker = True
                continue
            tensor = f.get_tensor(key)
            state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    config = transformer_config({k: tuple(v.shape) for k, v in state.items()}, marker if zero_cond_t is None else zero_cond_t,
                                axes_dims_rope)
    with torch.device("meta"):  # no weights allocated or initialised: the file's are assigned below
        model = QwenImageTransformer2DModel(**config)
    # The rotary tables are plain tensors computed in __init__ (not weights): build them on a real device.
    with torch.device(device):
        model.pos_embed = type(model.pos_embed)(theta=10000, axes_dim=list(config["axes_dims_rope"]), scale_rope=True)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UniRefError(
            f"{path.name} does not match a Qwen-Image transformer of its size: "
            + (f"missing {', '.join(missing[:3])}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        )
    model.load_state_dict(state, assign=True, strict=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UniRefError(f"{path.name}: {', '.join(left[:3])} were not in the file")
    return model.eval()


#: Prefixes of a VAE inside all-in-one checkpoints (ComfyUI's ``vae_key_prefix``), or none in ``models/vae/``.
VAE_PREFIXES = ("", "first_stage_model.", "vae.")
WAN21_MARKER = "decoder.middle.0.residual.0.gamma"
WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"


def vae_prefix(keys) -> str | None:
    """The prefix of a Wan-layout VAE's keys in a file (``""`` for none), or None when it holds none."""
    keys = set(keys)
    for prefix in VAE_PREFIXES:
        if f"{prefix}{WAN21_MARKER}" in keys:
            return prefix
    return None


def load_comfy_vae(path, dtype: torch.dtype | None = None, device="cpu"):
    """A ComfyUI single-file Qwen-Image VAE (``qwen_image_vae.safetensors``: Wan 2.1 keys such as
    ``encoder.middle.0.residual.0.gamma``) as diffusers' ``AutoencoderKLQwenImage``.

    The architecture is the one ComfyUI builds for such a file (``comfy/sd.py``: the Wan 2.1 VAE with its width
    read from ``decoder.head.0.gamma``, 16 latent channels, 8× spatial); the keys are renamed by diffusers' own
    Wan → diffusers conversion (``convert_wan_vae_to_diffusers``), and the load is strict, so a file of another
    layout is an error rather than a half-loaded model. The latent normalisation (``latents_mean`` /
    ``latents_std``) is not in the file: it is Qwen-Image's (diffusers' class defaults, which are the values
    ComfyUI's Wan 2.1 latent format uses)."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors import safe_open

    path = Path(path)
    keys = _keys(path)
    prefix = vae_prefix(keys)
    if prefix is None:
        raise UniRefError(
            f"{path.name} is not a Qwen-Image VAE: it has no '{WAN21_MARKER}' (first keys: {', '.join(keys[:3])}). "
            "Pick a file like qwen_image_vae.safetensors from models/vae/"
        )
    if f"{prefix}{WAN22_MARKER}" in keys:
        raise UniRefError(
            f"{path.name} is a Wan 2.2 VAE (48 latent channels, 16× spatial), which Qwen-Image models do not use: "
            "pick qwen_image_vae.safetensors (the Wan 2.1 layout)"
        )
    raw: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in keys:
            if key.startswith(prefix):
                tensor = f.get_tensor(key)
                raw[key[len(prefix) :]] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    state = convert_wan_vae_to_diffusers(raw)
    config = {"base_dim": int(raw["decoder.head.0.gamma"].shape[0]), "z_dim": int(raw["decoder.conv1.weight"].shape[1])}
    if config["z_dim"] != 16:
        raise UniRefError(f"{path.name} has {config['z_dim']} latent channels; a Qwen-Image VAE has 16")
    with torch.device("meta"):
        model = AutoencoderKLQwenImage(**config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UniRefError(
            f"{path.name} does not match the Qwen-Image VAE layout (Wan 2.1, 4 levels, 2 blocks each): "
            + (f"missing {', '.join(missing[:3])}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        )
    model.load_state_dict(state, assign=True, strict=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UniRefError(f"{path.name}: {', '.join(left[:3])} were not in the file")
    return model.eval()
