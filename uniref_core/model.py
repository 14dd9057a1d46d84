"""Loading a Qwen-Image-Edit-family model from a local diffusers-format folder.

The layout is the one of the published repos (Qwen-Image-Edit-2509/2511, UniRef):
``model_index.json, transformer/ (maybe sharded), vae/, text_encoder/, tokenizer/, processor/,
scheduler/``. Weights load only from safetensors and only from disk: no pickles, no hub, no
remote code. A Qwen-Image 2.1 folder is recognised (`model_family`) and checked (`check_qwen21_folder`), but
not loaded: this version runs the Edit family only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UniRefError

# model_index.json classes whose prompt template and reference handling we reproduce.
EDIT_PIPELINES = ("QwenImageEditPlusPipeline",)
#: model_index.json class of a Qwen-Image 2.1 folder: recognised and checked, not yet run.
QWEN21_PIPELINE = "QwenImage21Pipeline"
# component → (config files, any one of which must exist; the class it must be)
COMPONENTS = {
    "transformer": (("config.json",), "QwenImageTransformer2DModel"),
    "vae": (("config.json",), "AutoencoderKLQwenImage"),
    "text_encoder": (("config.json",), "Qwen2_5_VLForConditionalGeneration"),
    # Published repos carry preprocessor_config.json; transformers 5 writes processor_config.json.
    "processor": (("preprocessor_config.json", "processor_config.json"), None),
    "scheduler": (("scheduler_config.json",), None),
}
# The same for a Qwen-Image 2.1 folder.
QWEN21_COMPONENTS = {
    "transformer": (("config.json",), "QwenImage21Transformer2DModel"),
    "vae": (("config.json",), "AutoencoderKLQwenImage21"),
    "text_encoder": (("config.json",), "Qwen3VLForConditionalGeneration"),
    "processor": (("preprocessor_config.json", "processor_config.json"), None),
    "scheduler": (("scheduler_config.json",), None),
}
#: Qwen-Image 2.1's fixed sizes: the pipeline's VAE factor, and the pixels per Qwen3-VL vision slot (2x2 latents).
QWEN21_VAE_SCALE = 16
QWEN21_VL_SLOT_PX = 32
WEIGHTED = ("transformer", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Components:
    """The loaded parts of a model; what the pipeline and the trainers work with."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    processor: object
    scheduler_config: dict
    path: Path
    #: The settings the checkpoint was trained for (``uniref.json`` "defaults"), used where a caller gives none.
    defaults: dict = dataclasses.field(default_factory=dict)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent side: 8 for real checkpoints."""
        return vae_scale_of(dict(self.vae.config), self.path)

    @property
    def token_px(self) -> int:
        """Pixels per transformer token side (VAE scale × patch size): 16 for real checkpoints."""
        if self.transformer is None:  # loaded without it (a trainer's encoding pass): the configs say
            return token_px_of(self.path)
        return self.vae_scale * int(self.transformer.config.patch_size)


def vae_scale_of(vae_config: dict, folder="the model folder", real: int = 8) -> int:
    """The VAE's down-sampling factor, as diffusers' pipeline derives it: 2 ** len(temperal_downsample).

    Its encoder down-samples once per entry (len(dim_mult) − 1 stages); a config where the two disagree
    does not describe a VAE the pipeline can size images for, and is refused naming the folder. ``real``: the
    scale of the family's published checkpoints, for the message.
    """
    stages = vae_config.get("temperal_downsample")
    dim_mult = vae_config.get("dim_mult")
    if not isinstance(stages, list) or not isinstance(dim_mult, list) or len(stages) != len(dim_mult) - 1:
        raise UniRefError(
            f"{folder}: vae/config.json has temperal_downsample {stages!r} and dim_mult {dim_mult!r}; a Qwen-Image "
            "VAE down-samples once per dim_mult entry after the first, so give len(dim_mult) - 1 entries "
            f"(real checkpoints: {real.bit_length() - 1}, a {real}x VAE)"
        )
    scale = 2 ** len(stages)
    if not 2 <= scale <= 16:
        raise UniRefError(
            f"{folder}: its VAE scale is {scale}x; UniRef supports 2x to 16x VAEs (real checkpoints: {real}x)"
        )
    return scale


def token_px_of(path) -> int:
    """Pixels per token side of a model folder, from its configs alone (no weights loaded)."""
    root = Path(path).expanduser()
    vcfg = _read_json(root / "vae" / "config.json", "vae/config.json")
    tcfg = _read_json(root / "transformer" / "config.json", "transformer/config.json")
    token = vae_scale_of(vcfg, root) * int(tcfg.get("patch_size", 2))
    if token > 32 or token & (token - 1):
        raise UniRefError(f"{root}: a token of {token} px (VAE scale × patch size) is not a power of two up to 32")
    return token


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise UniRefError(
            f"{what} ({path}) could not be read as JSON ({e}); re-download or re-export the model"
        ) from None


def _check_weights(folder: Path, name: str) -> None:
    files = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    index = [f for f in files if f.endswith(".safetensors.index.json")]
    if index:
        shards = set(_read_json(folder / index[0], f"{name} weight index").get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise UniRefError(
                f"model component '{name}' is incomplete: shard(s) {', '.join(missing)} listed in {index[0]} are "
                "missing; finish the download"
            )
        return
    if any(f.endswith(".safetensors") for f in files):
        return
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        raise UniRefError(
            f"model component '{name}' has only pickle weights ({folder}); for safety UniRef loads safetensors only: "
            "convert them to .safetensors"
        )
    raise UniRefError(f"model component '{name}' has no weights (*.safetensors) in {folder}")


def check_model_folder(path) -> dict:
    """Validate a model folder without loading it; return model_index.json. Errors name what is missing."""
    root = Path(path).expanduser()
    index = _read_index(root)
    cls = index.get("_class_name")
    if cls == QWEN21_PIPELINE:
        raise UniRefError(
            f"{root} holds a Qwen-Image 2.1 model ({cls}); this version of UniRef runs Qwen-Image-Edit-2509/2511 "
            "folders (and UniPic 3.0 / UniRef weights) only: give one of those"
        )
    if cls not in EDIT_PIPELINES:
        raise UniRefError(
            f"{root} holds a {cls or 'unknown'} model, not a multi-image edit model of the Qwen-Image-Edit family "
            f"({', '.join(EDIT_PIPELINES)}); use Qwen-Image-Edit-2509/2511, UniPic 3.0 or UniRef weights"
        )
    _check_components(root, COMPONENTS, "Qwen-Image-Edit")
    tcfg = _read_json(root / "transformer" / "config.json", "transformer/config.json")
    if tcfg.get("use_additional_t_cond") or tcfg.get("use_layer3d_rope"):
        raise UniRefError(f"{root} is a layered (Qwen-Image-Layered) transformer; UniRef runs edit models only")
    token_px_of(root)  # a VAE scale the planner cannot size images for is refused here, naming the folder
    return index


def model_family(path) -> str:
    """ "edit" (Qwen-Image-Edit-2509/2511 and their fine-tunes) or "qwen21" (Qwen-Image 2.1), from the folder's
    model_index.json alone; any other model is refused naming its class."""
    root = Path(path).expanduser()
    cls = _read_index(root).get("_class_name")
    if cls in EDIT_PIPELINES:
        return "edit"
    if cls == QWEN21_PIPELINE:
        return "qwen21"
    raise UniRefError(
        f"{root} holds a {cls or 'unknown'} model, neither a Qwen-Image-Edit model ({', '.join(EDIT_PIPELINES)}) "
        f"nor a Qwen-Image 2.1 one ({QWEN21_PIPELINE}); use Qwen-Image-Edit-2509/2511, UniPic 3.0, UniRef or "
        "Qwen-Image 2.1 weights"
    )


def check_qwen21_folder(path) -> dict:
    """Validate a Qwen-Image 2.1 folder from its configs alone (no weights loaded); return model_index.json.

    Beyond the parts being there with their classes and safetensors weights, the parts must fit each other as
    QwenImage21Pipeline joins them: the transformer takes and gives the VAE's latent channels, reads text of the
    text encoder's width, the VAE is 16x, and one Qwen3-VL vision slot covers 32 px (2x2 latents)."""
    root = Path(path).expanduser()
    index = _read_index(root)
    if index.get("_class_name") != QWEN21_PIPELINE:
        raise UniRefError(
            f"{root} holds a {index.get('_class_name') or 'unknown'} model, not a Qwen-Image 2.1 one "
            f"({QWEN21_PIPELINE}); give the folder of a Qwen-Image 2.1 checkpoint"
        )
    _check_components(root, QWEN21_COMPONENTS, "Qwen-Image 2.1")
    tcfg = _read_json(root / "transformer" / "config.json", "transformer/config.json")
    vcfg = _read_json(root / "vae" / "config.json", "vae/config.json")
    ecfg = _read_json(root / "text_encoder" / "config.json", "text_encoder/config.json")
    same_release = "use the parts of one Qwen-Image 2.1 release together"

    z_dim = vcfg.get("z_dim")
    channels = (tcfg.get("in_channels"), tcfg.get("out_channels"))
    if channels != (z_dim, z_dim):
        raise UniRefError(
            f"{root}: the transformer's in/out channels {channels[0]}/{channels[1]} (transformer/config.json) are not "
            f"the VAE's z_dim {z_dim} (vae/config.json): the transformer denoises the VAE's latents unpacked; "
            f"{same_release}"
        )
    text_width = (ecfg.get("text_config") or {}).get("hidden_size")
    if text_width != tcfg.get("context_in_dim"):
        raise UniRefError(
            f"{root}: the text encoder's hidden size {text_width} (text_encoder/config.json text_config.hidden_size) "
            f"is not the transformer's context_in_dim {tcfg.get('context_in_dim')} (transformer/config.json); "
            f"{same_release}"
        )
    patch = vcfg.get("patch_size") or 1  # a patchifying VAE folds patch x patch pixels before its stages
    scale = vae_scale_of(vcfg, root, real=QWEN21_VAE_SCALE) * patch
    if scale != QWEN21_VAE_SCALE or vcfg.get("scale_factor_spatial", scale) != scale:
        raise UniRefError(
            f"{root}: the VAE (vae/config.json) is {scale}x (scale_factor_spatial "
            f"{vcfg.get('scale_factor_spatial')}); QwenImage21Pipeline sizes images for a {QWEN21_VAE_SCALE}x VAE: "
            f"{same_release}"
        )
    vision = ecfg.get("vision_config") or {}
    slot = (vision.get("patch_size") or 0) * (vision.get("spatial_merge_size") or 0)
    if slot != QWEN21_VL_SLOT_PX:
        raise UniRefError(
            f"{root}: the text encoder's vision slot is {slot} px (text_encoder/config.json vision_config patch_size "
            f"{vision.get('patch_size')} x spatial_merge_size {vision.get('spatial_merge_size')}); Qwen-Image 2.1 "
            f"puts 2x2 latents of {QWEN21_VAE_SCALE} px in each vision slot, {QWEN21_VL_SLOT_PX} px: {same_release}"
        )
    return index


def _read_index(root: Path) -> dict:
    """model_index.json of a folder, refused naming what is wrong when the folder or the file is not there."""
    if not root.exists():
        raise UniRefError(f"model folder not found: {root} — give the folder that holds model_index.json")
    if not root.is_dir():
        raise UniRefError(f"model path {root} is a file: give the diffusers-format folder that holds model_index.json")
    if not (root / "model_index.json").is_file():
        raise UniRefError(
            f"{root} is not a diffusers-format model folder (no model_index.json); give the folder of a "
            "Qwen-Image-Edit-2509/2511 or UniRef checkpoint"
        )
    return _read_json(root / "model_index.json", "model_index.json")


def _check_components(root: Path, components: dict, architecture: str) -> None:
    """Each part's folder, config file, class (``components``: as `COMPONENTS`) and safetensors weights."""
    fix = "re-download the model or restore the part"
    for name, (config_files, expected) in components.items():
        folder = root / name
        if not folder.is_dir():
            raise UniRefError(f"model folder {root} is missing the '{name}' component (folder {name}/): {fix}")
        config_file = next((f for f in config_files if (folder / f).is_file()), None)
        if config_file is None:
            raise UniRefError(f"model component '{name}' has no {' or '.join(config_files)} in {folder}: {fix}")
        if expected:
            found = _read_json(folder / config_file, f"{name}/{config_file}")
            found_cls = found.get("_class_name") or (found.get("architectures") or [None])[0]
            if found_cls != expected:
                raise UniRefError(
                    f"model component '{name}' is a {found_cls}, expected {expected}: this folder is not of the "
                    f"{architecture} architecture"
                )
        if name in WEIGHTED:
            _check_weights(folder, name)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' → bf16 on a GPU that supports it, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise UniRefError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


#: The networks of a model folder, in the order ``load_components`` loads them.
PARTS = ("text_encoder", "vae", "transformer")


def load_components(path, device="cpu", dtype="auto", parts=PARTS, transformer_dtype=None) -> Components:
    """Load the networks in ``parts`` from disk (safetensors only) onto ``device`` in ``dtype``, one at a time; the
    others are None (a trainer encodes with the text encoder and VAE, frees them, then loads the transformer).
    ``transformer_dtype``: the transformer's own dtype where it differs ("fp8": 8-bit linear layers in its blocks,
    computing in ``dtype``; see `load_transformer`)."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

    root = Path(path).expanduser()
    check_model_folder(root)
    device = torch.device(device)
    dt = resolve_dtype(dtype, device)
    common = {"use_safetensors": True, "local_files_only": True}
    loaded = dict.fromkeys(PARTS)
    try:
        for name in (p for p in PARTS if p in parts):  # each part straight into its dtype, then onto the device
            if name == "transformer":
                module = load_transformer(root, device, dt if transformer_dtype is None else transformer_dtype)
            elif name == "vae":
                module = AutoencoderKLQwenImage.from_pretrained(root / "vae", torch_dtype=dt, **common)
            else:
                module = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder", dtype=dt, **common)  # nosec B615  # a local folder, local_files_only=True in common: nothing is fetched from the Hub
            loaded[name] = module.to(device).eval().requires_grad_(False)
        processor = Qwen2VLProcessor.from_pretrained(root / "processor", local_files_only=True)  # nosec B615  # a local folder, local_files_only=True: nothing is fetched from the Hub
    except UniRefError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UniRefError(f"model folder {root} could not be loaded: {e}") from e
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    return Components(
        loaded["transformer"],
        loaded["vae"],
        loaded["text_encoder"],
        processor,
        scheduler_config,
        root,
        read_defaults(root),
    )


def load_transformer(root, device, dtype) -> torch.nn.Module:
    """The transformer of a diffusers folder in ``dtype`` (a torch dtype, or "fp8").

    "fp8": built on the meta device and filled tensor by tensor from the safetensors files, every linear layer of
    its blocks quantised to float8_e4m3fn with a per-tensor scale as it is read (`uniref_core.fp8.FP8Linear`, the
    layout ComfyUI's fp8 files use), everything else in bf16. No bf16 copy of the model exists at any point: the
    peak is the 8-bit model plus one layer."""
    from diffusers import QwenImageTransformer2DModel

    folder = Path(root) / "transformer"
    if dtype != "fp8":
        return own_rotary_caches(
            QwenImageTransformer2DModel.from_pretrained(
                folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True
            )
        )
    from .fp8 import quantize_fp8, swap_in_fp8_linears

    model = empty_transformer(folder, device)
    linears = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.")
    }
    state, layers = {}, {}
    for file in sorted(folder.glob("*.safetensors")):
        for key, tensor in read_safetensors(file):
            layer = key[: -len(".weight")]
            if layer in linears and key.endswith(".weight"):
                state[key], layers[layer] = (t.to(device) for t in quantize_fp8(tensor))
            else:
                state[key] = tensor.to(device, torch.bfloat16)
    swap_in_fp8_linears(model, layers, state, folder.name)
    model.load_state_dict(state, assign=True, strict=True)
    return model


def empty_transformer(folder, device) -> torch.nn.Module:
    """The transformer of a ``transformer/`` folder built on the meta device (its weights take no memory until they
    are filled), with its rotary tables, which ``__init__`` computes and no file holds, built for real on
    ``device``."""
    from diffusers import QwenImageTransformer2DModel

    config = {
        k: v
        for k, v in _read_json(Path(folder) / "config.json", "transformer/config.json").items()
        if not k.startswith("_")
    }
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    build_rotary_tables(model, config["axes_dims_rope"], device)
    return model


# The rotary embedding's methods that diffusers caches in lru_caches on the class, keyed by the module itself.
ROPE_CACHED = ("_get_device_freqs", "_compute_video_freqs", "_compute_condition_freqs")
ROPE_CACHE_SIZE = 128


def build_rotary_tables(model: torch.nn.Module, axes_dim, device) -> None:
    """The transformer's rotary embedding built for real on ``device`` (a model built on the meta device has none:
    its tables are computed in ``__init__``, no file holds them), its caches on the module (`own_rotary_caches`)."""
    with torch.device(device):
        model.pos_embed = type(model.pos_embed)(theta=10000, axes_dim=list(axes_dim), scale_rope=True)
    own_rotary_caches(model)


def own_rotary_caches(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer with its rotary embedding's frequency caches held by the embedding, not by its class.

    diffusers keeps those caches on the class, keyed by the module: every transformer a process ever loaded would
    stay referenced there with its tables, on the CPU and on the GPU (ComfyUI loads the model again after each
    "Free model and node cache"). Held by the module, the caches go when the model goes."""
    rope = model.pos_embed
    for name in ROPE_CACHED:
        if hasattr(type(rope), name):
            compute = inspect.unwrap(getattr(type(rope), name))  # the method without the class's cache
            object.__setattr__(rope, name, functools.lru_cache(ROPE_CACHE_SIZE)(compute.__get__(rope)))
    return model


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_header(fh, path) -> tuple[dict, int]:
    """The tensor entries of an open safetensors file (``__metadata__`` left out) and the offset its data starts at.

    The header is checked against the format before any tensor is read: a little-endian u64 length that fits the
    file, then a JSON object of ``{"dtype", "shape", "data_offsets"}`` entries whose bytes lie in the file and, for
    a dtype UniRef reads, match the shape. A file that is not one is refused naming it."""
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else None
    if length is None or length > size - 8:
        raise UniRefError(f"{path} is not a safetensors file (it ends inside its header): {SAFETENSORS_FIX}")
    try:
        header = json.loads(fh.read(length))
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise UniRefError(f"{path} is not a safetensors file (its header is not a JSON object): {SAFETENSORS_FIX}")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not _valid_entry(info, size - 8 - length):
            raise UniRefError(
                f"{path}: the header entry of tensor {name!r} is damaged ({info!r:.100}): {SAFETENSORS_FIX}"
            )
    return header, 8 + length


SAFETENSORS_FIX = "re-download or re-export the file"


def _valid_entry(info, data_size: int) -> bool:
    """A header entry whose shape is a list of sizes and whose data lies in the file, as many bytes as the shape."""

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(map(whole, shape)):
        return False
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(whole, offsets)):
        return False
    start, end = offsets
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    return start <= end <= data_size and (dtype is None or end - start == math.prod(shape) * dtype.itemsize)


def read_safetensors(path):
    """(name, CPU tensor) of a safetensors file, one at a time, read with plain reads. ``safe_open`` maps the file
    and its tensors keep the mapping alive, so every page read stays resident: quantising a bf16 file that way holds
    the whole file in memory beside the 8-bit result."""
    with open(path, "rb") as fh:
        header, data_start = read_safetensors_header(fh, path)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise UniRefError(f"{path}: tensor {name} has dtype {info['dtype']}, which UniRef cannot read")
            data = torch.empty(end - start, dtype=torch.uint8)
            fh.seek(data_start + start)
            if end > start:
                fh.readinto(memoryview(data.numpy()))
            yield name, data.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


#: Optional file in a model folder: {"defaults": {...}} with the settings the checkpoint was trained for.
DEFAULTS_FILE = "uniref.json"
#: Keys "defaults" may hold, and what each is (areas in pixels).
DEFAULT_KEYS = {
    "budget": "reference pixel budget (area) of mode 'budget'",
    "vl_budget": "total area of the VL encoder's reference copies",
    "output_area": "output area when the output follows a reference's aspect ratio",
    "steps": "denoising steps",
    "cfg": "true-CFG scale",
    "by_references": 'sizes for K references or more, e.g. {"4": {"output_area": 65536}}',
}
#: The defaults "by_references" may set: the sizes, which the number of references is known for.
BY_REFERENCES_KEYS = ("budget", "vl_budget", "output_area")


def read_defaults(root) -> dict:
    """The "defaults" of ``<root>/uniref.json``, checked; {} when the folder has none (Qwen checkpoints)."""
    path = Path(root) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    data = _read_json(path, "model defaults")
    defaults = data.get("defaults", {}) if isinstance(data, dict) else None
    if not isinstance(defaults, dict):
        raise UniRefError(
            f"{path}: 'defaults' must be an object of settings; delete the file to use built-in defaults"
        )
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise UniRefError(f"{path}: unknown default(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_KEYS)}")
    by_refs = defaults.get("by_references", {})
    if not isinstance(by_refs, dict):
        raise UniRefError(f"{path}: default 'by_references' must be an object, {DEFAULT_KEYS['by_references']}")
    for k, sizes in by_refs.items():
        if not (isinstance(k, str) and k.isdecimal() and 1 <= int(k) <= 1000) or not isinstance(sizes, dict):
            raise UniRefError(
                f"{path}: 'by_references' maps a number of references (1, 2, …) to sizes, got {k!r}: "
                f"{DEFAULT_KEYS['by_references']}"
            )
        unknown = sorted(set(sizes) - set(BY_REFERENCES_KEYS))
        if unknown:
            raise UniRefError(
                f"{path}: 'by_references' {k} sets {', '.join(unknown)}; it may set {', '.join(BY_REFERENCES_KEYS)}"
            )
        for key, value in sizes.items():
            _check_default(path, key, value, f"by_references {k}: ")
    for key, value in defaults.items():
        if key != "by_references":
            _check_default(path, key, value)
    return dict(defaults)


def _check_default(path: Path, key: str, value, where: str = "") -> None:
    # NaN, Infinity and a 400-digit number are numbers to JSON but no setting: int() or float() of them raises
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 2**53:
        raise UniRefError(
            f"{path}: {where}default '{key}' ({DEFAULT_KEYS[key]}) must be a positive number, got {value!r}"
        )
