"""What SFT trains: the whole transformer or LoRA adapters on it, plus an optional EMA of those weights.

The trainable weights are always handled by name (``named_trainable``), so checkpoints, EMA and
export share one view of them: every transformer parameter for a full fine-tune, or the LoRA
matrices (peft names, ``….to_q.lora_A.default.weight``) for LoRA.

ComfyUI LoRA format (``comfy_lora_state_dict``): ComfyUI 0.30's ``comfy/lora.py`` maps every
``diffusion_model.<path>.weight`` of a QwenImage model to the key ``diffusion_model.<path>`` (its
generic format), and ``comfy/weight_adapter/lora.py`` reads ``<key>.lora_B.weight`` (up),
``<key>.lora_A.weight`` (down) and ``<key>.alpha``, applying W += alpha / rank · up @ down. ComfyUI's
qwen_image module paths equal diffusers' (``transformer_blocks.N.attn.to_q``, ``img_mlp.net.2``…).
"""

from __future__ import annotations

import contextlib
import re

import torch

from .config import LoraSettings

COMFY_PREFIX = "diffusion_model."
_PEFT_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def setup_transformer(transformer, lora: LoraSettings | None, gradient_checkpointing: bool) -> None:
    """Make ``transformer`` trainable in place: LoRA adapters only, or every weight. Trainable weights are fp32
    whatever the frozen base's dtype (bf16 or fp8 base: the adapters train in full precision beside it)."""
    from uniref_core.fp8 import FP8Linear, add_trainable_lora

    transformer.requires_grad_(False)
    if lora is not None and any(isinstance(m, FP8Linear) for m in transformer.modules()):
        # peft refuses non-nn.Linear layers: the fp8 layers carry their own adapters, under peft's names.
        if not add_trainable_lora(transformer, lora.rank, lora.alpha, lora.targets, lora.dropout):
            raise ValueError(f"lora.targets {lora.targets} matched no layer of the transformer")
    elif lora is not None:
        from peft import LoraConfig

        transformer.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                target_modules=list(lora.targets),
                lora_dropout=lora.dropout,
                init_lora_weights=True,
            )
        )
        if not any(p.requires_grad for p in transformer.parameters()):
            raise ValueError(f"lora.targets {lora.targets} matched no layer of the transformer")
    else:
        transformer.requires_grad_(True)
    for p in transformer.parameters():
        if p.requires_grad and p.dtype != torch.float32:  # peft makes adapters in the base layer's dtype
            p.data = p.data.float()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()


@contextlib.contextmanager
def adapters_disabled(transformer):
    """The start model for the duration: LoRA adapters off (peft's or the fp8 layers' own)."""
    from uniref_core.fp8 import set_lora_enabled

    peft = getattr(transformer, "_hf_peft_config_loaded", False)
    if peft:
        transformer.disable_adapters()
    set_lora_enabled(transformer, False)
    try:
        yield
    finally:
        set_lora_enabled(transformer, True)
        if peft:
            transformer.enable_adapters()


def named_trainable(transformer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


def trainable_state_dict(transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in named_trainable(transformer).items()}


@torch.no_grad()
def load_trainable_state_dict(transformer, state: dict[str, torch.Tensor]) -> None:
    params = named_trainable(transformer)
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"checkpoint weights do not match the trainable weights: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, p in params.items():
        p.copy_(state[name].to(p.device, p.dtype))


class EMA:
    """Exponential moving average of the trainable weights (fp32, on the weights' device).

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` (the schedule of diffusers'
    ``EMAModel``): with a fixed 0.998 the average still holds 0.998^300 = 55 % of the random start
    after 300 steps, so early evaluation grids show noise whatever the live weights have learned.
    ``step`` is the global step, so a resumed run continues the same schedule.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    def decay_at(self, step: int) -> float:
        """The decay of the update that ends global step ``step`` (1 for the first)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter], step: int) -> None:
        decay = self.decay_at(step)
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.to("cpu").contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(state[n])

    @contextlib.contextmanager
    def applied(self, params: dict[str, torch.nn.Parameter]):
        """Swap the EMA weights in for the duration (evaluation), then put the live ones back."""
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])


def comfy_lora_state_dict(peft_state: dict[str, torch.Tensor], alpha: float, dtype=None) -> dict[str, torch.Tensor]:
    """peft LoRA weights → ComfyUI's Qwen-Image LoRA keys (lora_A = down, lora_B = up, plus alpha)."""
    out = {}
    for name, tensor in peft_state.items():
        m = _PEFT_KEY.match(name)
        if m is None:
            raise ValueError(f"{name} is not a LoRA weight (expected …lora_A/lora_B…weight)")
        key = COMFY_PREFIX + m["path"]
        out[f"{key}.lora_{m['ab']}.weight"] = tensor.to(dtype) if dtype else tensor
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return {k: v.contiguous() for k, v in sorted(out.items())}


@torch.no_grad()
def merge_comfy_lora(transformer, lora_state: dict[str, torch.Tensor], strength: float = 1.0) -> int:
    """Add a ComfyUI-format LoRA into a plain transformer's weights, as ComfyUI applies it:
    W += strength · alpha / rank · B @ A. Returns the number of layers changed."""
    modules = dict(transformer.named_modules())
    done = 0
    for key in lora_state:
        if not key.endswith(".lora_A.weight"):
            continue
        base = key[: -len(".lora_A.weight")]
        path = base[len(COMFY_PREFIX) :] if base.startswith(COMFY_PREFIX) else base
        if path not in modules:
            raise ValueError(f"LoRA key {key} names no layer {path!r} of the transformer")
        down, up = lora_state[key].float(), lora_state[f"{base}.lora_B.weight"].float()
        alpha = float(lora_state.get(f"{base}.alpha", torch.tensor(float(down.shape[0]))))
        weight = modules[path].weight
        weight += (strength * alpha / down.shape[0] * (up @ down)).to(weight.device, weight.dtype)
        done += 1
    return done
