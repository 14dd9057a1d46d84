"""TEST-ONLY custom node folder: a route that tells the soak what the host's memory is made of.

GET /uniref_soak/memory (call it between prompts) answers with the live torch tensors on the CPU (count and bytes
of their storages), the Python objects the garbage collector tracks, the objects of the pack's own types (a leak of
ours grows these), and glibc's malloc statistics: ``in_use`` (what is allocated now), ``free_held`` (freed but kept
by malloc: fragmentation or caching, not a leak) and ``mmapped``. GET /uniref_soak/holders: the CPU tensors that are
no module's weights, by shape, and what holds them. Registers no nodes.
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


def _name(obj) -> str:
    return (repr(obj) if isinstance(obj, tuple) else type(obj).__name__)[:120]


def holders(limit: int = 12) -> dict:
    """The CPU tensors that are no module's parameter or buffer, by shape, and what holds the first of each shape
    (its referrers and theirs; a cache shows as its key tuple and ``_lru_cache_wrapper``): where tensors that
    outlive a prompt are kept."""
    gc.collect()
    objects = gc.get_objects()
    owned = set()
    for o in objects:
        if isinstance(o, torch.nn.Module):
            owned.update(id(t) for t in (*o.parameters(recurse=False), *o.buffers(recurse=False)))
    loose = [o for o in objects if isinstance(o, torch.Tensor) and o.device.type == "cpu" and id(o) not in owned]
    del objects

    def referrers(obj) -> list:  # not this function's own lists, nor frames
        return [r for r in gc.get_referrers(obj) if not (isinstance(r, list) and len(r) > 1000) and r is not loose]

    shapes = Counter(str(tuple(t.shape)) for t in loose)
    held_by = {}
    for shape, _ in shapes.most_common(limit):
        tensor = next(t for t in loose if str(tuple(t.shape)) == shape)
        held_by[shape] = [[_name(r), [_name(rr) for rr in referrers(r)[:3]]] for r in referrers(tensor)[:3]]
    return {"shapes": dict(shapes.most_common(limit)), "held_by": held_by}


@PromptServer.instance.routes.get("/uniref_soak/memory")
async def _memory(request):
    return web.json_response(memory())


@PromptServer.instance.routes.get("/uniref_soak/holders")
async def _holders(request):
    return web.json_response(holders())
