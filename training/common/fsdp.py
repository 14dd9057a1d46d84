"""FSDP2 for a full fine-tune (SFT ``"fsdp": true``): every process holds 1/N of each weight, gradient and optimizer
state, and never the whole model, not even while it loads.

    with process_group(device):                       # torchrun's, or a private one for a single process
        model = sharded_transformer(cfg, device)      # DTensor parameters: this process's rows of every weight

The transformer is built on the meta device, sharded there (one ``fully_shard`` unit per
``QwenImageTransformerBlock``, plus the root for the embeddings and the output layers), and only then given memory:
each process fills its own rows, from the model folder one tensor at a time, or from a sharded checkpoint
(`common.checkpoint.load_sharded`, written at any process count).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from uniref_core.errors import UniRefError


@contextlib.contextmanager
def process_group(device):
    """The default process group for the duration: the launcher's (torchrun, accelerate launch) where there is one,
    else a private one of this single process, so ``fully_shard`` and the sharded checkpoints run unchanged."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():  # accelerate's end_training destroys it on the way out of a finished run
            dist.destroy_process_group()


def sharded_transformer(cfg, device, checkpoint: Path | None = None) -> torch.nn.Module:
    """The transformer to fine-tune, fp32, sharded over the processes; from ``checkpoint`` (a sharded weights folder)
    when given, else from the model folder."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from uniref_core.model import empty_transformer

    from .checkpoint import load_sharded
    from .model import use_checkpointing
    from .trainable import setup_transformer

    # The loss reads predict_velocity's slice (a view) of the output out of place: the hook FSDP warns about stays.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    folder = Path(cfg.model) / "transformer"
    device = torch.device(device)
    model = empty_transformer(folder, device)
    setup_transformer(model, None, use_checkpointing(cfg))
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16: blocks gathered (and their gradients made) in bf16, the bf16 autocast would cast them to for every matmul
    # anyway; reduced and stepped in fp32. Half the gathered bytes in flight and in memory.
    bf16 = cfg.mixed_precision == "bf16"
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)  # memory for this process's shards only
    params = {name: p.detach() for name, p in model.named_parameters()}
    if checkpoint is not None:
        load_sharded(checkpoint, params)
    else:
        _fill_from_folder(folder, params)
    return model


@torch.no_grad()
def _fill_from_folder(folder: Path, params: dict[str, torch.Tensor]) -> None:
    """Each parameter's shard from the model folder's safetensors, one tensor at a time (at most one whole tensor,
    never the whole model, is in this process's memory)."""
    from torch.distributed.tensor import distribute_tensor

    from uniref_core.model import read_safetensors

    left = set(params)
    for file in sorted(folder.glob("*.safetensors")):
        for key, tensor in read_safetensors(file):  # plain reads: no memory map keeps the file resident
            if key not in params:
                raise UniRefError(
                    f"{file} holds {key!r}, which the transformer of {folder / 'config.json'} does not "
                    "have: the weights and the config are of different models"
                )
            p = params[key]
            whole = tensor.to(p.device_mesh.device_type, torch.float32)
            # src_data_rank None: every process read the same file, so each keeps its rows without sending any
            p.copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None))
            left.discard(key)
    if left:
        raise UniRefError(
            f"{folder} has no weights for {sorted(left)[:3]} ({len(left)} in all): the folder is "
            "incomplete; restore it from the original download"
        )


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the sharded gradients to ``max_norm`` over all processes; the norm before clipping."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def local_fraction(model) -> tuple[int, int]:
    """(elements of the weights this process holds, elements of the whole model)."""
    from torch.distributed.tensor import DTensor

    mine = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return mine, sum(p.numel() for p in model.parameters())
