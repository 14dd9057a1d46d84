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
from .fp8 import is_fp8, quantized_layers, swap_in_fp8_linears
from .model import build_rotary_tables

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


def transformer_config(
    shapes: dict[str, tuple], zero_cond_t: bool, axes_dims_rope=None, name: str = "the file"
) -> dict:
    """diffusers ``QwenImageTransformer2DModel`` config from the (unprefixed) weights' shapes. The rotary split of
    a head is not in the weights: Qwen-Image's (16, 56, 56) for its 128-wide heads, as ComfyUI assumes; a model
    with other heads must say its own (``axes_dims_rope``)."""
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    needed = ("img_in.weight", "txt_in.weight", "proj_out.weight", "transformer_blocks.0.attn.norm_q.weight")
    missing = [k for k in needed if k not in shapes]
    if missing or not blocks:
        raise UniRefError(
            f"{name} has no {', '.join(missing) or 'transformer_blocks.*'}: it is not a whole Qwen-Image diffusion "
            "model (a LoRA, a partial or a truncated save?); pick a complete file such as "
            "qwen_image_edit_2511_bf16.safetensors"
        )
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    if inner % head_dim:
        raise UniRefError(f"transformer width {inner} is not a multiple of its head size {head_dim}")
    patch = 2
    axes = tuple(axes_dims_rope) if axes_dims_rope else QWEN_AXES
    if sum(axes) != head_dim:
        raise UniRefError(
            f"the model's heads are {head_dim} wide but its rotary split {axes} sums to {sum(axes)}: "
            "give the split it was trained with (axes_dims_rope, three even numbers summing to the head size)"
        )
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


def load_comfy_transformer(
    path, dtype: torch.dtype | None = None, device="cpu", zero_cond_t: bool | None = None, axes_dims_rope=None
):
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
        metadata = f.metadata()
        for key in keys:
            if not key.startswith(prefix) and key != "scaled_fp8":
                continue
            name = key[len(prefix) :] if key.startswith(prefix) else key
            if name == ZERO_COND_MARKER:
                marker = True
                continue
            tensor = f.get_tensor(key)
            # fp8 weights stay fp8 (up-cast per layer when they run); everything else takes the asked dtype.
            cast = dtype is not None and tensor.is_floating_point() and not is_fp8(tensor)
            state[name] = tensor.to(dtype) if cast else tensor
    fp8_layers = quantized_layers(state, metadata, path.name)
    config = transformer_config(
        {k: tuple(v.shape) for k, v in state.items()},
        marker if zero_cond_t is None else zero_cond_t,
        axes_dims_rope,
        path.name,
    )
    with torch.device("meta"):  # no weights allocated or initialised: the file's are assigned below
        model = QwenImageTransformer2DModel(**config)
    if fp8_layers:
        swap_in_fp8_linears(model, fp8_layers, state, path.name)
    build_rotary_tables(model, config["axes_dims_rope"], device)
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
                raw[key[len(prefix) :]] = (
                    tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                )
    state = convert_wan_vae_to_diffusers(raw)
    config = {
        "base_dim": int(raw["decoder.head.0.gamma"].shape[0]),
        "z_dim": int(raw["decoder.conv1.weight"].shape[1]),
    }
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


TEXT_ENCODER_MARKER = "model.layers.0.self_attn.q_proj.weight"
#: What ComfyUI assumes for every Qwen2.5-VL text-encoder file (``comfy/text_encoders/llama.py``
#: ``Qwen25_7BVLI_Config`` and ``qwen_vl.Qwen2VLVisionTransformer``): these are not in the weights' shapes.
QWEN25_VL_FIXED = {
    "head_dim": 128,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "mrope_section": [16, 24, 24],
    "vision_heads": 16,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


def text_encoder_config(shapes: dict[str, tuple]):
    """transformers ``Qwen2_5_VLConfig`` for a ComfyUI text-encoder file, sizes from its weights' shapes and the rest
    as ComfyUI assumes them (``QWEN25_VL_FIXED``)."""
    from transformers import Qwen2_5_VLConfig

    fixed = QWEN25_VL_FIXED

    def count(pattern):
        return 1 + max(int(m.group(1)) for k in shapes if (m := re.match(pattern, k)))

    vocab, hidden = shapes["model.embed_tokens.weight"]
    if shapes["model.layers.0.self_attn.q_proj.weight"][0] % fixed["head_dim"]:
        raise UniRefError("the text encoder's attention width is not a multiple of Qwen2.5-VL's 128-wide heads")
    text = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=count(r"model\.layers\.(\d+)\."),
        intermediate_size=shapes["model.layers.0.mlp.gate_proj.weight"][0],
        num_attention_heads=shapes["model.layers.0.self_attn.q_proj.weight"][0] // fixed["head_dim"],
        num_key_value_heads=shapes["model.layers.0.self_attn.k_proj.weight"][0] // fixed["head_dim"],
        rope_theta=fixed["rope_theta"],
        rms_norm_eps=fixed["rms_norm_eps"],
        rope_scaling={"type": "mrope", "mrope_section": list(fixed["mrope_section"])},
        bos_token_id=151643,
        eos_token_id=151645,
    )
    vision = None
    if "visual.patch_embed.proj.weight" in shapes:
        vision = dict(
            hidden_size=shapes["visual.patch_embed.proj.weight"][0],
            depth=count(r"visual\.blocks\.(\d+)\."),
            intermediate_size=shapes["visual.blocks.0.mlp.gate_proj.weight"][0],
            num_heads=fixed["vision_heads"],
            out_hidden_size=shapes["visual.merger.mlp.2.weight"][0],
            patch_size=fixed["patch_size"],
            temporal_patch_size=fixed["temporal_patch_size"],
            spatial_merge_size=fixed["spatial_merge_size"],
            window_size=fixed["window_size"],
            fullatt_block_indexes=list(fixed["fullatt_block_indexes"]),
        )
    return Qwen2_5_VLConfig(
        text_config=text, **({"vision_config": vision} if vision else {}), tie_word_embeddings=False
    )


def load_comfy_text_encoder(path, dtype: torch.dtype | None = None, device="cpu"):
    """A ComfyUI single-file Qwen2.5-VL text encoder (``models/text_encoders/qwen_2.5_vl_7b.safetensors``: flat
    ``model.layers.*`` / ``visual.*`` keys) as transformers' ``Qwen2_5_VLForConditionalGeneration``. fp8 files
    (``qwen_2.5_vl_7b_fp8_scaled.safetensors``, in any of `uniref_core.fp8`'s layouts) keep their linear layers
    in 8 bits, as fp8 diffusion models do.

    Keys are renamed by transformers' own legacy-checkpoint mapping for the class (``get_model_conversion_mapping``
    and ``rename_source_key``), the load is strict. ComfyUI's files carry no language-model head (it only encodes
    prompts); ``lm_head`` then shares the token embedding's tensor, which nothing in editing uses."""
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    path = Path(path)
    keys = _keys(path)
    if TEXT_ENCODER_MARKER not in keys or "model.embed_tokens.weight" not in keys:
        raise UniRefError(
            f"{path.name} is not a Qwen2.5-VL text encoder: it has no '{TEXT_ENCODER_MARKER}' (first keys: "
            f"{', '.join(keys[:3])}). Pick a file like qwen_2.5_vl_7b.safetensors from models/text_encoders/"
        )
    raw: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata()
        for key in keys:
            tensor = f.get_tensor(key)
            # fp8 weights stay fp8 (up-cast per layer when they run); everything else takes the asked dtype.
            cast = dtype is not None and tensor.is_floating_point() and not is_fp8(tensor)
            raw[key] = tensor.to(dtype) if cast else tensor
    fp8_layers = quantized_layers(raw, metadata, path.name)  # takes the scales out of raw
    config = text_encoder_config({k: tuple(v.shape) for k, v in raw.items()})
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    expected = model.state_dict()
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, converters, model.base_model_prefix, expected)[0]

    state = {rename(k): v for k, v in raw.items()}
    if fp8_layers:
        layers = {rename(f"{name}.weight")[: -len(".weight")]: scale for name, scale in fp8_layers.items()}
        swap_in_fp8_linears(model, layers, state, path.name)
        expected = model.state_dict()
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state.get("model.language_model.embed_tokens.weight")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected or "visual.patch_embed.proj.weight" not in raw:
        raise UniRefError(
            f"{path.name} does not match a Qwen2.5-VL text encoder (language model and vision tower): "
            + (f"missing {', '.join(missing[:3])}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
            + ("" if "visual.patch_embed.proj.weight" in raw else "no vision tower (visual.*)")
        )
    model.load_state_dict(state, assign=True, strict=True)
    # The rotary modules' non-persistent buffers (inverse frequencies) were made on the meta device: build those
    # modules again, for real, from their own config.
    with torch.device(device):
        for module in list(model.modules()):
            if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
                fresh = type(module)(module.config)
                for name, buf in fresh.named_buffers(recurse=False):
                    module.register_buffer(name, buf, persistent=False)
                for name, value in vars(fresh).items():  # e.g. original_inv_freq, a plain attribute copy
                    if isinstance(value, torch.Tensor) and not name.startswith("_"):
                        setattr(module, name, value)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UniRefError(f"{path.name}: {', '.join(left[:3])} were not in the file")
    return model.eval()


def load_single_files(diffusion_model, text_encoder, vae, tokenizer_dir, device="cpu", dtype="auto"):
    """The engine's components from ComfyUI's three single files (``models/diffusion_models/``,
    ``models/text_encoders/``, ``models/vae/``) and a Qwen2.5 tokenizer folder (``vocab.json`` + ``merges.txt``:
    ComfyUI ships one in its own tree, ``comfy/text_encoders/qwen25_tokenizer``). The image processor and
    scheduler settings are the published Qwen-Image-Edit ones. fp8 layers of the diffusion model stay fp8."""
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from .model import Components, resolve_dtype
    from .tiny import IMAGE_PROCESSOR_CONFIG, SCHEDULER_CONFIG, VIDEO_PROCESSOR_CONFIG

    device = torch.device(device)
    dt = resolve_dtype(dtype, device)
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "vocab.json").is_file() or not (tokenizer_dir / "merges.txt").is_file():
        raise UniRefError(
            f"tokenizer folder {tokenizer_dir} has no vocab.json / merges.txt: give a Qwen2.5 tokenizer "
            "folder (ComfyUI's is comfy/text_encoders/qwen25_tokenizer in its source tree)"
        )
    tokenizer = Qwen2Tokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)  # nosec B615  # a local folder, local_files_only=True: nothing is fetched from the Hub
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**IMAGE_PROCESSOR_CONFIG),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**VIDEO_PROCESSOR_CONFIG),
    )
    parts = (
        load_comfy_transformer(diffusion_model, dtype=dt),
        load_comfy_vae(vae, dtype=dt),
        load_comfy_text_encoder(text_encoder, dtype=dt),
    )
    te_width, joint = parts[2].config.text_config.hidden_size, parts[0].config.joint_attention_dim
    if te_width != joint:
        raise UniRefError(
            f"{Path(text_encoder).name} gives {te_width}-wide text states but {Path(diffusion_model).name} "
            f"expects {joint}: pick the text encoder that belongs to this diffusion model"
        )
    if parts[1].config.z_dim * 4 != parts[0].config.in_channels:
        raise UniRefError(
            f"{Path(vae).name} has {parts[1].config.z_dim} latent channels but {Path(diffusion_model).name} "
            f"takes {parts[0].config.in_channels // 4}: pick the VAE that belongs to this diffusion model"
        )
    for m in parts:
        m.to(device).eval().requires_grad_(False)
    transformer, vae_model, te = parts
    return Components(transformer, vae_model, te, processor, dict(SCHEDULER_CONFIG), Path(diffusion_model), {})
