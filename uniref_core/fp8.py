"""fp8 weights as ComfyUI's checkpoint files store them, kept in 8 bits in memory and up-cast per layer at compute.

Three layouts are read, as ComfyUI reads them (``comfy/utils.py`` ``convert_old_quants``, ``comfy/ops.py``
``mixed_precision_ops``):

- plain: ``float8_e4m3fn`` / ``float8_e5m2`` weights and nothing else (scale 1);
- the older "scaled fp8": a ``scaled_fp8`` marker tensor and a per-layer ``<layer>.scale_weight``
  (``<layer>.scale_input`` is for fp8 matrix multiplication and not needed to up-cast);
- the newer one: ``<layer>.weight_scale`` and a ``<layer>.comfy_quant`` JSON entry (``{"format": "float8_e4m3fn"}``),
  or the same per-layer formats in the safetensors header's ``_quantization_metadata``.

The dequantised weight is ``weight.to(compute dtype) * scale``, ComfyUI's ``TensorCoreFP8Layout``. Other
quantised formats (nvfp4, mxfp8, int8, …) are refused by name.

LoRAs on an fp8 layer are not merged into its 8-bit weight (re-quantising would round the LoRA away and lose
the original): the layer keeps the LoRAs' low-rank factors and adds ``Σ s · up @ (down @ x)`` when it runs,
so a LoRA costs its own size in memory, not a float copy of the layer.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UniRefError

FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES.values()


class FP8Linear(nn.Module):
    """A linear layer whose weight stays fp8 and is up-cast (times its per-tensor scale) when it runs.

    The weight and scale are stored as integer views (uint8, int32), so ``module.to(torch.bfloat16)`` and
    friends, which cast every floating-point tensor, leave them as they are; moving devices still works."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fp8_dtype=torch.float8_e4m3fn):
        super().__init__()
        self.in_features, self.out_features, self.fp8_dtype = in_features, out_features, fp8_dtype
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale_bits", torch.ones((), dtype=torch.float32).view(torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # LoRA factors, stacked over LoRAs (strengths folded into lora_down); not saved, moved with the module.
        self.register_buffer("lora_down", None, persistent=False)
        self.register_buffer("lora_up", None, persistent=False)

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.weight_scale_bits.view(torch.float32)

    def set_fp8(self, weight: torch.Tensor, scale: torch.Tensor | None):
        self.fp8_dtype = weight.dtype
        self.weight_fp8 = weight.contiguous().view(torch.uint8)
        scale = torch.ones(()) if scale is None else scale.detach().float().reshape(())
        self.weight_scale_bits = scale.to(weight.device).view(torch.int32)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight_fp8.view(self.fp8_dtype).to(dtype) * self.weight_scale.to(dtype)

    def set_lora(self, parts) -> None:
        """Carry exactly these ``(strength, down [rank, in], up [out, rank])`` LoRAs (none: ``[]``)."""
        if not parts:
            self.lora_down = self.lora_up = None
            return
        device = self.weight_fp8.device
        dtype = torch.float32 if self.bias is None else self.bias.dtype
        self.lora_down = torch.cat([s * d.to(device, torch.float32) for s, d, _ in parts]).to(dtype)
        self.lora_up = torch.cat([u.to(device, torch.float32) for _, _, u in parts], dim=1).to(dtype)

    def add_trainable_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """A trainable fp32 LoRA beside the 8-bit weight, laid out and initialised as peft's (``lora_A.default``
        Kaiming-uniform, ``lora_B.default`` zero, scale alpha / rank), so checkpoints and exports of an fp8-base run
        carry peft's names. peft itself refuses layers that are not ``nn.Linear``."""
        self.lora_A = nn.ModuleDict({"default": nn.Linear(self.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, self.out_features, bias=False)})
        nn.init.kaiming_uniform_(self.lora_A["default"].weight, a=5**0.5)
        nn.init.zeros_(self.lora_B["default"].weight)
        self.lora_A.to(self.weight_fp8.device)
        self.lora_B.to(self.weight_fp8.device)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_scaling = alpha / rank
        self.lora_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the weight is up-cast straight to the autocast dtype: no float32 copy of the layer.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        out = F.linear(x.to(dtype), self.dequantized(dtype), bias)
        if self.lora_down is not None:
            out = out + F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        if getattr(self, "lora_enabled", False):
            a, b = self.lora_A["default"], self.lora_B["default"]
            out = out + b(a(self.lora_dropout(x.to(a.weight.dtype)))).to(out.dtype) * self.lora_scaling
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.fp8_dtype}"


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, per-tensor scale) with ``weight ≈ fp8 · scale``: the largest magnitude maps to 448,
    e4m3's largest finite value (ComfyUI's ``TensorCoreFP8Layout`` quantises the same way)."""
    w = weight.float()
    scale = (w.abs().max() / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    return (w / scale).to(torch.float8_e4m3fn), scale


def quantized_layers(
    state: dict[str, torch.Tensor], metadata: dict | None, file_name: str
) -> dict[str, torch.Tensor | None]:
    """``{layer name: scale or None}`` for every layer whose weight in ``state`` is fp8, after taking the scale
    and quantisation entries out of ``state`` (it is changed in place). Unknown formats are errors."""
    formats: dict[str, object] = {}
    header = (metadata or {}).get("_quantization_metadata")
    if header:
        layers = _json_object(header, file_name, "its _quantization_metadata").get("layers", {})
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise UniRefError(f"{file_name}: its _quantization_metadata 'layers' is not an object of layer settings")
        formats.update({k: v.get("format") for k, v in layers.items()})
    for key in [k for k in state if k.endswith(".comfy_quant")]:
        conf = state.pop(key)
        text = conf.numpy().tobytes() if conf.dtype == torch.uint8 else b""  # JSON stored as bytes
        formats[key[: -len(".comfy_quant")]] = _json_object(text, file_name, f"'{key}'").get("format")
    bad = sorted({str(f) for f in formats.values() if not isinstance(f, str) or f not in FP8_DTYPES})
    if bad:
        raise UniRefError(
            f"{file_name} is quantised as {', '.join(map(str, bad))}, which is not supported: use a bf16 "
            "or fp8 (float8_e4m3fn) file"
        )
    state.pop("scaled_fp8", None)
    scales: dict[str, torch.Tensor] = {}
    for key in list(state):
        for suffix in (".scale_weight", ".weight_scale"):
            if key.endswith(suffix):
                scales[key[: -len(suffix)]] = state.pop(key)
        if key.endswith((".scale_input", ".input_scale")):
            state.pop(key)
    layers = {k[: -len(".weight")]: None for k, v in state.items() if k.endswith(".weight") and is_fp8(v)}
    for layer, scale in scales.items():
        if layer not in layers:
            raise UniRefError(f"{file_name}: '{layer}' has an fp8 scale but its weight is not fp8")
        if scale.numel() != 1:  # FP8Linear holds one scale per layer, as ComfyUI's TensorCoreFP8Layout
            raise UniRefError(
                f"{file_name}: '{layer}' has an fp8 scale of shape {tuple(scale.shape)}; UniRef reads one scale "
                "per layer (per-tensor fp8): use such a file, or a bf16 one"
            )
        layers[layer] = scale
    return layers


def _json_object(text, file_name: str, what: str) -> dict:
    """The JSON object a quantised file stores as text, or a clear error naming the file."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise UniRefError(
            f"{file_name}: {what} is not a JSON object of quantisation settings (the file is damaged, or of a "
            "layout UniRef does not know): use a bf16 or fp8 (float8_e4m3fn) file"
        )
    return value


def swap_in_fp8_linears(
    model: nn.Module, layers: dict[str, torch.Tensor | None], state: dict[str, torch.Tensor], file_name: str
) -> None:
    """Replace the model's ``nn.Linear`` named in ``layers`` by ``FP8Linear`` holding the file's fp8 weight; their
    ``.weight`` entries in ``state`` become the layers' 8-bit buffers, so ``load_state_dict(state, assign=True)``
    then loads the rest (biases included) as usual."""
    modules = dict(model.named_modules())
    for name, scale in layers.items():
        old = modules.get(name)
        if not isinstance(old, nn.Linear):
            raise UniRefError(f"{file_name}: '{name}.weight' is fp8 but '{name}' is not a linear layer of the model")
        weight = state.pop(f"{name}.weight")
        if tuple(weight.shape) != (old.out_features, old.in_features):
            raise UniRefError(
                f"{file_name}: '{name}.weight' is {tuple(weight.shape)}, the model's layer "
                f"{(old.out_features, old.in_features)}"
            )
        new = FP8Linear(old.in_features, old.out_features, bias=old.bias is not None, fp8_dtype=weight.dtype)
        new.to(weight.device)
        new.set_fp8(weight, scale)
        if old.bias is not None:
            new.bias = old.bias  # still meta: the ordinary load assigns it
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, new)
        state[f"{name}.weight_fp8"], state[f"{name}.weight_scale_bits"] = new.weight_fp8, new.weight_scale_bits


def add_trainable_lora(model: nn.Module, rank: int, alpha: float, targets, dropout: float = 0.0) -> int:
    """Trainable LoRAs on the model's fp8 layers whose names match ``targets`` as peft matches them (the name, or
    its ending after a dot); returns how many. A target that names an unquantised linear layer is refused: the run
    would silently train fewer layers than asked."""
    done = 0
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if not isinstance(module, FP8Linear):
            if isinstance(module, nn.Linear):
                raise UniRefError(
                    f"lora target {name!r} is not an fp8 layer (base_dtype fp8 quantises the linear "
                    "layers of transformer_blocks): target block layers only, or use base_dtype bf16"
                )
            continue
        module.add_trainable_lora(rank, alpha, dropout)
        done += 1
    return done


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the trainable LoRAs of ``add_trainable_lora`` on or off (the start model, for a KL term)."""
    for module in model.modules():
        if isinstance(module, FP8Linear) and hasattr(module, "lora_A"):
            module.lora_enabled = enabled
