"""Export an SFT checkpoint for inference.

    python -m training.export --checkpoint runs/x/checkpoints/step_00001000 --out models/my-uniref
    python -m training.export --checkpoint … --out my_lora.safetensors --lora-only

Full export: a diffusers-format model folder — the base model's other components copied as they
are, the trained transformer (LoRA merged in, if the run used LoRA) saved as safetensors — that
``UniRefPipeline.from_pretrained`` (and the UniRef ComfyUI loader) open like any published checkpoint.

``--lora-only`` (LoRA runs): one ``.safetensors`` in the key format ComfyUI loads for Qwen-Image
LoRAs: ``diffusion_model.<module path>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``.
By default the EMA weights are exported when the checkpoint has them (``--weights live`` for the others).
A sharded checkpoint (an FSDP run's) is read whole by this one process, at whatever process count it was written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from uniref_core.atomic import atomic_dir
from uniref_core.errors import UniRefError
from uniref_core.model import check_model_folder, read_safetensors_header

from .common import checkpoint as ckpt_mod
from .common.cli import exit_on_error
from .common.trainable import comfy_lora_state_dict, merge_comfy_lora

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _weights(ckpt: Path, which: str) -> tuple[dict[str, torch.Tensor], str]:
    ema = ckpt_mod.load_tensors(ckpt, ckpt_mod.EMA_FILE)
    if which == "ema" and ema is None:
        raise UniRefError(f"{ckpt} has no EMA weights (the run had ema_decay null): use --weights live")
    if which in ("ema", "auto") and ema is not None:
        return ema, "ema"
    return ckpt_mod.load_tensors(ckpt, ckpt_mod.TRAINABLE_FILE), "live"


def _base_dtype(transformer_dir: Path) -> torch.dtype:
    """The dtype the base model's transformer weights are stored in (bf16 for the published ones)."""
    for f in sorted(transformer_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            header, _ = read_safetensors_header(fh, f)
        for meta in header.values():
            return DTYPES.get(meta["dtype"], torch.float32)
    return torch.float32


def _lora_state(ckpt: Path, state: dict, which: str, dtype=None) -> tuple[dict[str, torch.Tensor], str]:
    if not state.get("lora"):
        raise UniRefError(f"{ckpt} is a full fine-tune, not a LoRA run: export without --lora-only")
    weights, used = _weights(ckpt, which)
    return comfy_lora_state_dict(weights, state["lora"]["alpha"], dtype), used


def export(checkpoint, out, lora_only: bool = False, weights: str = "auto", model: str | None = None) -> Path:
    """Write the export; returns its path. ``model`` overrides the base model path stored in the checkpoint."""
    ckpt = Path(checkpoint)
    if not (ckpt / ckpt_mod.STATE_FILE).is_file():
        raise UniRefError(f"{ckpt} is not a finished checkpoint (no {ckpt_mod.STATE_FILE})")
    state = ckpt_mod.read_state(ckpt)
    base = Path(model or state["model"]["path"])
    check_model_folder(base)
    if ckpt_mod.model_fingerprint(base) != state["model"]["fingerprint"]:
        raise UniRefError(
            f"base model {base} is not the one {ckpt} was trained from (fingerprint differs): "
            "give the original with --model"
        )
    out = Path(out)
    meta = {
        "base_model_fingerprint": state["model"]["fingerprint"],
        "step": str(state["global_step"]),
        "config_hash": state["config_hash"],
    }

    if lora_only:
        lora, used = _lora_state(ckpt, state, weights)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta.update(
            {
                "format": "comfyui-qwen-image-lora",
                "rank": str(state["lora"]["rank"]),
                "alpha": str(state["lora"]["alpha"]),
                "weights": used,
            }
        )
        save_file(lora, str(out), metadata=meta)
        return out

    from diffusers import QwenImageTransformer2DModel

    dtype = _base_dtype(base / "transformer")
    transformer = QwenImageTransformer2DModel.from_pretrained(
        base / "transformer", torch_dtype=torch.float32, use_safetensors=True, local_files_only=True
    )
    if state.get("lora"):
        lora, used = _lora_state(ckpt, state, weights)
        merge_comfy_lora(transformer, lora)  # in fp32, then cast: as precise as the base dtype allows
    elif state.get("sharded"):
        if weights == "ema":
            raise UniRefError(f"{ckpt} has no EMA weights (FSDP runs keep none): use --weights live")
        # Read in place, whole tensors from every process's file: one fp32 copy of the model, never two.
        ckpt_mod.load_sharded(ckpt / ckpt_mod.TRAINABLE_SHARDS, transformer.state_dict())
        used = "live"
    else:
        trained, used = _weights(ckpt, weights)
        missing, unexpected = transformer.load_state_dict(trained, strict=False)
        if missing or unexpected:
            raise UniRefError(
                f"{ckpt} does not fit {base}'s transformer (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    with atomic_dir(out) as tmp:
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("transformer"))
        if dtype != torch.float32:
            transformer.to(dtype)  # back to the base model's storage dtype (bf16 for the published ones)
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        (tmp / "uniref_training.json").write_text(
            json.dumps({**meta, "weights": used, "checkpoint": str(ckpt)}, indent=1)
        )
    return out


@exit_on_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="a step_… folder written by training.sft or training.msgrpo"
    )
    parser.add_argument(
        "--out", required=True, help="model folder to write, or the .safetensors file with --lora-only"
    )
    parser.add_argument("--lora-only", action="store_true", help="write only the LoRA, in ComfyUI's key format")
    parser.add_argument(
        "--weights",
        choices=("auto", "ema", "live"),
        default="auto",
        help="auto: EMA weights when the checkpoint has them",
    )
    parser.add_argument("--model", default=None, help="base model folder, if it moved since training")
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.out, args.lora_only, args.weights, args.model)
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
