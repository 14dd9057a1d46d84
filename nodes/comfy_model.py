"""ComfyUI side of a loaded UniRef model: model folders, device, memory management.

The engine's modules are wrapped in one ``ModelPatcher`` so ComfyUI's model management moves
them to the GPU when a UniRef node needs them and back to the offload device when another model
needs the memory or the user presses "Free model and node cache".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch

from ..uniref_core.defaults import BUILTIN_MODELS, builtin_model_dir
from ..uniref_core.errors import UniRefError
from ..uniref_core.model import check_model_folder
from ..uniref_core.pipeline import UniRefPipeline

FOLDER = "uniref"
BUILTIN = "uniref-default (built-in)"
#: The built-in models as the Load node lists them ("uniref-default (built-in)", ...), default first.
BUILTINS = {f"{name} (built-in)": name for name in BUILTIN_MODELS}
# How deep to look for diffusers folders under models/uniref/ (e.g. Qwen/Qwen-Image-Edit-2511).
SEARCH_DEPTH = 2


def register_model_folder() -> None:
    """models/uniref/ (and extra_model_paths entries named 'uniref') hold diffusers-format folders."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


def list_models() -> list[str]:
    """The built-in models first, then every folder with a model_index.json under models/uniref/."""
    names = [label for label, name in BUILTINS.items() if (builtin_model_dir(name) / "model_index.json").is_file()]
    for root in folder_paths.get_folder_paths(FOLDER):
        base = Path(root)
        if not base.is_dir():
            continue
        for index in (
            sorted(base.glob("model_index.json"))
            + sorted(base.glob("*/model_index.json"))
            + sorted(base.glob("*/*/model_index.json"))
        ):
            rel = index.parent.relative_to(base).as_posix()
            if rel != "." and rel not in names and rel.count("/") < SEARCH_DEPTH:
                names.append(rel)
    return names


def resolve_model(name: str) -> Path:
    if name in BUILTINS:
        return builtin_model_dir(BUILTINS[name])
    for root in folder_paths.get_folder_paths(FOLDER):
        path = Path(root) / name
        if (path / "model_index.json").is_file() or path.is_dir():
            return path
    raise UniRefError(
        f"model '{name}' was not found in models/{FOLDER}/: put a diffusers-format model folder there "
        "(the layout of Qwen-Image-Edit-2509/2511) and refresh"
    )


class _Part(torch.nn.Module):
    """One of the engine's networks, with the attributes ModelPatcher expects of a model."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = module
        self.device = next(module.parameters()).device
        self._dtype = dtype

    def get_dtype(self) -> torch.dtype:
        return self._dtype

    def memory_required(self, *args, **kwargs) -> int:
        return 0


PARTS = ("text_encoder", "transformer", "vae")
#: Load node option: "blocks" keeps these two in CPU memory, streamed to the GPU block by block (the engine's
#: UniRefPipeline.enable_block_offload); ComfyUI then manages only the VAE.
OFFLOAD_MODES = ("none", "blocks")
BLOCK_OFFLOADED = ("text_encoder", "transformer")


@dataclass
class UniRefModel:
    """What flows along a UNIREF_MODEL link: the engine plus one ModelPatcher per network, so
    encoding holds only the text encoder and VAE on the GPU and sampling only the transformer."""

    name: str
    pipe: UniRefPipeline
    patchers: dict
    #: (LoraWeights, strength) pairs from UniRef LoRA nodes upstream; merged into the transformer when a sampler
    #: runs, and taken out again when a run's model carries other LoRAs or none (the node left the graph).
    loras: tuple = ()
    #: bytes kept free on the GPU for block offload: the largest transformer block twice, plus activations
    offload_reserve: int = 0

    def load(self, *parts: str, memory_required: int = 0) -> UniRefPipeline:
        """Ask ComfyUI to put these parts on its device with ``memory_required`` bytes free beside them for the run
        (it offloads other models if needed); the transformer then carries exactly this model's LoRAs."""
        managed = [p for p in parts if not (self.pipe.offload == "blocks" and p in BLOCK_OFFLOADED)]
        if len(managed) < len(parts):  # room for one block at a time: other models leave the GPU if needed
            mm.free_memory(self.offload_reserve + memory_required, mm.get_torch_device())
        mm.load_models_gpu([self.patchers[p] for p in managed], memory_required=memory_required)
        if "transformer" in parts:
            self.pipe.set_loras(self.loras)
        return self.pipe

    def with_lora(self, lora_name: str, strength: float) -> UniRefModel:
        """This model plus one LoRA from ComfyUI's models/loras/ (a new link value; the input is unchanged)."""
        from dataclasses import replace

        from ..uniref_core.lora import read_lora

        path = Path(folder_paths.get_full_path_or_raise("loras", lora_name))
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _LORA_CACHE:
            _LORA_CACHE.clear()  # one file at a time is kept read; ComfyUI caches the node's output anyway
            _LORA_CACHE[key] = read_lora(path)
        return replace(self, loras=(*self.loras, (_LORA_CACHE[key], float(strength))))


_LORA_CACHE: dict = {}


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        # Qwen-Image overflows in fp16: bf16 where the device has it, else fp32.
        if device.type != "cpu" and mm.should_use_bf16(device):
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


def _check_offload(offload: str) -> None:
    if offload not in OFFLOAD_MODES:
        raise UniRefError(f"offload is '{offload}': pick one of {', '.join(OFFLOAD_MODES)}")


def load_model(name: str, dtype: str, offload: str = "none") -> UniRefModel:
    _check_offload(offload)
    path = resolve_model(name)
    check_model_folder(path)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    logging.info("UniRef: loading model %s from %s", name, path)
    pipe = UniRefPipeline.from_pretrained(path, device=offload_device, dtype=pick_dtype(dtype, load_device))
    return _wrap(name, pipe, load_device, offload_device, offload)


def comfy_tokenizer_dir() -> Path:
    """The Qwen2.5 tokenizer ComfyUI ships in its own source tree (no download)."""
    # comfy/text_encoders is a namespace package (no __file__): go from a module of the comfy package.
    return Path(mm.__file__).resolve().parent / "text_encoders" / "qwen25_tokenizer"


def load_model_files(
    diffusion_model: str, text_encoder: str, vae: str, dtype: str, offload: str = "none"
) -> UniRefModel:
    """A model from ComfyUI's single files in models/diffusion_models/, models/text_encoders/ and models/vae/."""
    from ..uniref_core.comfy_files import load_single_files

    _check_offload(offload)
    paths = {
        "diffusion model": (folder_paths.get_full_path("diffusion_models", diffusion_model), "diffusion_models"),
        "text encoder": (folder_paths.get_full_path("text_encoders", text_encoder), "text_encoders"),
        "vae": (folder_paths.get_full_path("vae", vae), "vae"),
    }
    for what, (path, folder) in paths.items():
        if not path:
            raise UniRefError(
                f"{what} file was not found in models/{folder}/: pick one from the list (refresh after adding files)"
            )
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    logging.info("UniRef: loading single files %s, %s, %s", diffusion_model, text_encoder, vae)
    components = load_single_files(
        paths["diffusion model"][0],
        paths["text encoder"][0],
        paths["vae"][0],
        comfy_tokenizer_dir(),
        device=offload_device,
        dtype=pick_dtype(dtype, load_device),
    )
    return _wrap(diffusion_model, UniRefPipeline(components), load_device, offload_device, offload)


def _wrap(name: str, pipe: UniRefPipeline, load_device, offload_device, offload: str = "none") -> UniRefModel:
    reserve = 0
    if offload == "blocks":
        pipe.enable_block_offload(load_device, offload_device)
        blocks = pipe.c.transformer.transformer_blocks  # buffers too: fp8 weights are buffers
        block = max(sum(t.numel() * t.element_size() for t in (*b.parameters(), *b.buffers())) for b in blocks)
        reserve = 2 * block + 1024**3
    patchers = {
        part: comfy.model_patcher.ModelPatcher(
            _Part(getattr(pipe.c, part), pipe.dtype), load_device=load_device, offload_device=offload_device
        )
        for part in PARTS
    }
    return UniRefModel(name=name, pipe=pipe, patchers=patchers, offload_reserve=reserve)
