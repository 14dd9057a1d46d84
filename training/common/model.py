"""The model a trainer works with, loaded one part at a time in the dtype each part runs in.

1. ``load_encoders``: the text encoder and the VAE, for the encoding pass (`common.cache`), in the frozen base's
   dtype (bf16 for an fp8 base: encoding is one pass, and 8-bit encoders would change what is learned from).
2. ``free``: they leave the device (and the process) before the transformer loads.
3. ``load_transformer``: the transformer straight into its dtype: fp32 for a full fine-tune (every weight trains),
   else the frozen base's dtype (bf16, or fp8 linear layers in the blocks); LoRA adapters are made fp32 by
   `common.trainable.setup_transformer`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
from pathlib import Path

import torch

from uniref_core.memory import trim_host_heap
from uniref_core.model import Components, empty_transformer, load_components

from .config import CHECKPOINTING_ABOVE, base_dtype


def transformer_parameters(model) -> int:
    """The transformer's parameter count, from its config alone (built on the meta device: no weights)."""
    module = empty_transformer(Path(model) / "transformer", "meta")
    return sum(math.prod(p.shape) for p in module.parameters())


def use_checkpointing(cfg) -> bool:
    """The config's ``gradient_checkpointing``, or when unset: on above 1 B transformer parameters."""
    if cfg.gradient_checkpointing is not None:
        return bool(cfg.gradient_checkpointing)
    return transformer_parameters(cfg.model) > CHECKPOINTING_ABOVE


def load_encoders(cfg, device) -> Components:
    """The text encoder and VAE (no transformer) for the encoding pass."""
    dtype = "bf16" if base_dtype(cfg) == "fp8" else base_dtype(cfg)
    return load_components(cfg.model, device=device, dtype=dtype, parts=("text_encoder", "vae"))


# glibc's mallopt parameters, and its defaults (what a process without MALLOC_*_THRESHOLD_ starts with).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_DEFAULT_THRESHOLD = 128 * 1024


@contextlib.contextmanager
def heap_kept(device):
    """Keep freed host memory in the process while the encoding pass runs on the CPU.

    The VAE's activations are megabytes each, so glibc maps them fresh for every image and unmaps them when freed:
    each image then faults every page in again (~150 k faults per 256² row; a third of the pass's CPU time spent in
    the kernel). With glibc's thresholds raised, freed blocks are reused; on exit the thresholds return to what the
    process had (``MALLOC_*_THRESHOLD_`` from the environment, else glibc's default) and `free` trims the heap.
    A GPU pass, a C library other than glibc, or thresholds the user set in the environment are left as they are."""
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    libc = None
    if torch.device(device).type == "cpu" and not any(n in os.environ for n in names):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            libc = None
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)


def free(device) -> None:
    """Return what dropped modules held: the allocator's cache on a GPU; on the host, glibc's free heap pages (the
    encoding pass leaves many small freed blocks that malloc keeps for the process otherwise)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    trim_host_heap()


def load_transformer(cfg, device) -> torch.nn.Module:
    """The transformer to train, in fp32 for a full fine-tune and in the frozen base's dtype under LoRA."""
    base = base_dtype(cfg)
    if cfg.lora is None or base == "fp32":
        return load_components(cfg.model, device=device, dtype="fp32", parts=("transformer",)).transformer
    if base == "fp8":
        check_fp8(device)
    return load_components(
        cfg.model,
        device=device,
        dtype="bf16",
        parts=("transformer",),
        transformer_dtype="fp8" if base == "fp8" else torch.bfloat16,
    ).transformer


def check_fp8(device) -> None:
    """fp8 weights need torch's float8 types and, on a GPU, one that computes with them (compute capability ≥ 8.9
    runs fp8 natively; older GPUs still up-cast per layer, which is what FP8Linear does everywhere)."""
    from uniref_core.errors import UniRefError

    if not hasattr(torch, "float8_e4m3fn"):
        raise UniRefError(
            f"base_dtype fp8 needs torch ≥ 2.1 (float8 types); this is torch {torch.__version__}: "
            "upgrade torch or use base_dtype bf16"
        )
    try:
        torch.zeros(1, device=device).to(torch.float8_e4m3fn).to(torch.bfloat16)
    except (RuntimeError, TypeError) as e:
        raise UniRefError(f"base_dtype fp8: {device} cannot hold float8 weights ({e}); use base_dtype bf16") from None
