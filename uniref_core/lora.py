"""LoRA files for the transformer: the key layouts found in the wild, read into one form, merged at a strength
and taken out again.

Layouts (detected from the keys; converted by diffusers' own Qwen-Image reader,
``QwenImageLoraLoaderMixin.lora_state_dict``, which also folds each layer's ``alpha / rank`` into its weights):

- peft / diffusers: ``transformer.transformer_blocks.N.attn.to_q.lora_A.weight`` / ``lora_B.weight``;
- kohya / musubi-tuner: ``lora_unet_transformer_blocks_N_attn_to_q.lora_down.weight`` / ``lora_up.weight``
  and ``.alpha``;
- ComfyUI / ai-toolkit: ``diffusion_model.transformer_blocks.N.attn.to_q.lora_A.weight`` / ``lora_B.weight``
  (and ``.alpha``), which is also what ``training.export --lora`` writes.

Weights are read from safetensors only. Merging is exact in fp32 (W + Σ strength · B @ A, cast back to the
layer's dtype once); fp8 layers (`uniref_core.fp8.FP8Linear`) are not merged but carry the factors and add
them when they run. `LoraPatcher` keeps each patched layer's original weight so that removing a LoRA
(or changing its strength) restores the model bit for bit instead of subtracting.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UniRefError
from .fp8 import FP8Linear

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_A, _B = ".lora_A.weight", ".lora_B.weight"
# The low-rank factors of every layout: peft/diffusers/ComfyUI (A/B, peft's adapter name maybe kept) and kohya.
FACTOR = re.compile(r"\.lora_(A|B|down|up)\.(default\.)?weight$")


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One LoRA file: per transformer Linear (its module name), ``(down [rank, in], up [out, rank])`` with
    ``alpha / rank`` already folded in, so the layer's change at strength s is ``s · up @ down``."""

    path: Path
    layers: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def rank(self) -> int:
        return max(down.shape[0] for down, _ in self.layers.values())


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:STRENGTH`` (the CLI's ``--lora``); a colon not followed by a number is part of the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            strength = float(tail)
        except ValueError:
            return Path(text), 1.0
        if not math.isfinite(strength):
            raise UniRefError(f"--lora {text}: the strength after ':' must be a finite number, e.g. {path}:0.8")
        return Path(path), strength
    return Path(text), 1.0


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors and its diffusers LoRA metadata (``lora_adapter_metadata``: peft's ``r``, ``lora_alpha``,
    ``rank_pattern``, ``alpha_pattern``; ``{}`` when absent)."""
    import json

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise UniRefError(f"LoRA file {path} does not exist: give the path of a .safetensors LoRA")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UniRefError(
            f"LoRA file {path} is a pickle ({path.suffix}), which can run code when loaded and is refused: convert it "
            "to safetensors once, in an environment you trust (load it with torch.load and save it with "
            "safetensors.torch.save_file), and load the .safetensors file"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("lora_adapter_metadata")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UniRefError(f"LoRA file {path} is not a readable safetensors file ({e})") from None
    try:
        meta = json.loads(raw_meta) if raw_meta else {}
    except json.JSONDecodeError:
        meta = {}
    # A pipeline's save_lora_weights prefixes the transformer's entries ("transformer.lora_alpha").
    return tensors, {k.removeprefix("transformer."): v for k, v in meta.items()} if isinstance(meta, dict) else {}


def _metadata_scale(module: str, rank: int, meta: dict, path: Path) -> float:
    """peft's ``lora_alpha / r`` for one layer, from diffusers' saved adapter config (patterns match a module name's
    end, as peft matches them); 1 when the file carries none (diffusers' and ComfyUI's default)."""
    alpha, patterns = meta.get("lora_alpha"), meta.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise UniRefError(
            f"LoRA file {path}: the alpha_pattern of its lora_adapter_metadata is {patterns!r}, not an object of "
            "module name → alpha: the file is damaged, re-export it"
        )
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    if not alpha:
        return 1.0
    number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not number or not 0 < alpha < 2**53:  # NaN, Infinity and 400-digit numbers are JSON numbers too
        raise UniRefError(
            f"LoRA file {path}: its lora_adapter_metadata gives {module} the alpha {alpha!r}; an alpha is a positive "
            "number (the layer's scale is alpha / rank): the file is damaged, re-export it"
        )
    return float(alpha) / rank


def _check_entries(raw: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse, naming the entry, what would break the conversion or the merge: a factor that is not a matrix of rank
    at least 1, or an alpha that is not one finite number of at least 0 (diffusers' rescaling loops forever on a
    negative one)."""
    for key, tensor in raw.items():
        if key.endswith(".alpha"):
            alpha = tensor.float().item() if tensor.numel() == 1 else math.nan
            if not 0 <= alpha < math.inf:
                what = alpha if tensor.numel() == 1 else f"of shape {tuple(tensor.shape)}"
                raise UniRefError(
                    f"LoRA file {path}: {key} is {what}; a layer's alpha is one number, 0 or more (the layer's scale "
                    "is alpha / rank): the file is damaged, re-download or re-export it"
                )
        elif FACTOR.search(key) and (tensor.ndim != 2 or 0 in tensor.shape):
            raise UniRefError(
                f"LoRA file {path}: {key} has shape {tuple(tensor.shape)}; a LoRA factor is a matrix, [rank, in] or "
                "[out, rank] with rank at least 1: the file is damaged or not a LoRA of linear layers"
            )


def read_lora(path) -> LoraWeights:
    """Read a LoRA file in any of the layouts above into `LoraWeights`."""
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    path = Path(path)
    raw, meta = _read_safetensors(path)
    # Where the file has no per-layer alpha, diffusers takes lora_alpha / r from its saved adapter config.
    use_meta = bool(meta) and not any(k.endswith(".alpha") for k in raw)
    lora_keys = [k for k in raw if "lora" in k]
    if not lora_keys:
        raise UniRefError(
            f"{path} holds no LoRA weights (keys like {', '.join(list(raw)[:3]) or 'none'}); expected "
            "'…lora_A.weight'/'…lora_B.weight' (peft, diffusers, ComfyUI) or '…lora_down.weight'/'…lora_up.weight' "
            "(kohya). A full checkpoint belongs in Load UniRef Model, not here"
        )
    _check_entries(raw, path)
    try:
        converted = QwenImageLoraLoaderMixin.lora_state_dict(dict(raw))
    except (ValueError, KeyError) as e:
        raise UniRefError(f"LoRA file {path} could not be read as a Qwen-Image LoRA: {e}") from None
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, down in converted.items():
        if not key.endswith(_A):
            continue
        up = converted.get(key[: -len(_A)] + _B)
        if up is None:
            raise UniRefError(f"LoRA file {path}: {key} has no matching lora_B/lora_up weight")
        module = key[: -len(_A)].removeprefix("transformer.")
        if use_meta:
            up = up * _metadata_scale(module, down.shape[0], meta, path)
        layers[module] = (down, up)
    if not layers:
        raise UniRefError(f"LoRA file {path}: no down/up weight pairs found among {', '.join(lora_keys[:3])}, …")
    return LoraWeights(path=path, layers=layers)


def lora_deltas(transformer: torch.nn.Module, loras: Sequence[tuple[LoraWeights, float]]) -> dict:
    """Per Linear of ``transformer``: the list of ``(strength, down, up)`` the LoRAs add to it. A LoRA none of whose
    layers is in the model (a LoRA for another model) is an error naming its first layers; one that matches only
    partly is applied where it matches, with a warning naming what it skipped."""
    modules = dict(transformer.named_modules())
    out: dict[str, list] = {}
    for lora, strength in loras:
        missing = [m for m in lora.layers if not isinstance(modules.get(m), (torch.nn.Linear, FP8Linear))]
        if len(missing) == len(lora.layers):
            raise UniRefError(
                f"LoRA {lora.name} matches no layer of this model (first keys: {', '.join(missing[:3])}); it was made "
                "for another model. Use a LoRA trained for Qwen-Image / Qwen-Image-Edit"
            )
        if missing:
            log.warning(
                "LoRA %s: %d of its %d layers are not in this model and were skipped (first: %s)",
                lora.name,
                len(missing),
                len(lora.layers),
                ", ".join(missing[:3]),
            )
        for name, (down, up) in lora.layers.items():
            if name in missing:
                continue
            layer = modules[name]
            shape = (layer.out_features, layer.in_features)
            if (up.shape[0], down.shape[1]) != shape or up.shape[1] != down.shape[0]:
                raise UniRefError(
                    f"LoRA {lora.name}: layer {name} is {up.shape[0]}×{down.shape[1]} in the LoRA but "
                    f"{shape[0]}×{shape[1]} in the model; it was made for a model of another size"
                )
            out.setdefault(name, []).append((float(strength), down, up))
    return out


class LoraPatcher:
    """Merges LoRAs into a transformer's Linear weights and takes them out again.

    ``apply([(lora, strength), …])`` makes the model carry exactly those LoRAs: layers patched before and not now
    are restored from the copy kept when they were first patched (on the CPU), so a LoRA removed from the graph,
    or applied at another strength, leaves no trace of the earlier state."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self._originals: dict[str, torch.Tensor] = {}
        self._fp8: set[str] = set()  # fp8 layers carrying LoRA factors
        self._current: tuple = ()

    @property
    def active(self) -> tuple:
        return self._current

    def apply(self, loras: Sequence[tuple[LoraWeights, float]]) -> int:
        """Patch the model to carry ``loras``; returns the number of layers that carry a LoRA now."""
        wanted = tuple((lora, float(s)) for lora, s in loras)
        if [(id(lo), s) for lo, s in wanted] == [(id(lo), s) for lo, s in self._current]:
            return len(self._originals) + len(self._fp8)
        deltas = lora_deltas(self.transformer, wanted)  # raises before anything changes
        self.restore()
        modules = dict(self.transformer.named_modules())
        with torch.no_grad():
            for name, parts in deltas.items():
                if isinstance(modules[name], FP8Linear):  # 8-bit weight untouched: the layer adds the factors
                    modules[name].set_lora(parts)
                    self._fp8.add(name)
                    continue
                weight = modules[name].weight
                self._originals[name] = weight.detach().to("cpu", copy=True)
                merged = weight.detach().float()
                for strength, down, up in parts:
                    merged = merged + strength * (
                        up.to(merged.device, torch.float32) @ down.to(merged.device, torch.float32)
                    )
                weight.copy_(merged.to(weight.dtype))
        self._current = wanted
        return len(deltas)

    def restore(self) -> None:
        """Every patched layer back to its original weight."""
        modules = dict(self.transformer.named_modules())
        for name in self._fp8:
            modules[name].set_lora([])
        self._fp8.clear()
        with torch.no_grad():
            for name, original in self._originals.items():
                weight = modules[name].weight
                weight.copy_(original.to(weight.device, weight.dtype))
        self._originals.clear()
        self._current = ()
