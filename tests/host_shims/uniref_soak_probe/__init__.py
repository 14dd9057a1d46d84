"""TEST-ONLY custom node folder: a route that tells the soak what the host's memory is made of.

GET /uniref_soak/memory (call it between prompts) answers with the live torch tensors on the CPU (count and bytes
of their storages), the Python objects the garbage collector tracks, the objects of the pack's own types (a leak of
ours grows these), and glibc's malloc statistics: ``in_use`` (what is allocated now), ``free_held`` (freed but kept
by malloc: fragmentation or caching, not a leak) and ``mmapped``. Registers no nodes.
"""

import ctypes
import gc
from collections import Counter

import torch
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}
# Types whose instances should not pile up across prompts: the pack's model, conditioning and LoRA objects.
WATCHED = ("UniRefModel", "UniRefPipeline", "Conditioning", "LoraWeights", "UniRefCancelled", "Components")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _malloc() -> dict:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return {}
    m = libc.mallinfo2()
    mib = 1 / 2**20
    return {"in_use": (m.uordblks + m.hblkhd) * mib, "free_held": m.fordblks * mib, "mmapped": m.hblkhd * mib}


def memory() -> dict:
    gc.collect()
    objects = gc.get_objects()
    storages = {}
    for o in objects:
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            storage = o.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    kinds = Counter(type(o).__name__ for o in objects)
    return {
        "tensors": sum(isinstance(o, torch.Tensor) for o in objects),
        "tensor_mib": sum(storages.values()) / 2**20,
        "objects": len(objects),
        "watched": {name: kinds[name] for name in WATCHED},
        "malloc": _malloc(),
    }


@PromptServer.instance.routes.get("/uniref_soak/memory")
async def _memory(request):
    return web.json_response(memory())
