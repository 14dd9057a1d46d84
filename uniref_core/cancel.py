"""Stopping a run within a fraction of a step.

A caller hands the pipeline ``is_cancelled``, a plain callable that says whether the user asked to stop (ComfyUI's
interrupt flag, the CLI's Ctrl-C). Between denoising steps is too coarse: one step of a large image takes minutes. So
while a cancellable run is going, every block of the networks it runs (each transformer block, each stage of the VAE
per tile, each text-encoder layer) first asks, and the run ends with `UniRefCancelled` before the next block starts.
The checks are forward pre-hooks, on the modules only inside ``cancel_points``: a run without ``is_cancelled``, and
any run after it, carries none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .errors import UniRefCancelled

ShouldCancel = Callable[[], bool]


def check_cancel(is_cancelled: ShouldCancel | None, where: str) -> None:
    """Raise `UniRefCancelled` ("cancelled <where>") when ``is_cancelled`` says so."""
    if is_cancelled is not None and is_cancelled():
        raise UniRefCancelled(f"cancelled {where}")


def blocks_of(module: torch.nn.Module | None) -> list[torch.nn.Module]:
    """Where a run may stop inside ``module``: every entry of every ModuleList in it (the transformer's blocks, the
    VAE's down, mid and up stages and their residual blocks, the text encoder's and vision tower's layers)."""
    if module is None:
        return []
    return [m for list_ in module.modules() if isinstance(list_, torch.nn.ModuleList) for m in list_]


@contextmanager
def cancel_points(is_cancelled: ShouldCancel | None, modules, where: str) -> Iterator[None]:
    """Inside, each block of ``modules`` (`blocks_of`) asks ``is_cancelled`` before it runs and raises
    `UniRefCancelled` ("cancelled <where>") if so; the hooks leave on exit, however it exits. Without
    ``is_cancelled`` nothing is installed."""
    if is_cancelled is None:
        yield
        return
    check_cancel(is_cancelled, where)

    def before_block(module, args) -> None:
        check_cancel(is_cancelled, where)

    handles = [block.register_forward_pre_hook(before_block) for m in modules for block in blocks_of(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
