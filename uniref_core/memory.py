"""Will this edit fit? The peak memory one run needs beyond the weights already loaded, counted from its plan.

A run has four phases, one after the other, each freeing what it made before the next starts (only the small
conditioning tensors carry over): the prompt through the text encoder, each reference through the VAE encoder, the
denoising steps (one transformer call on [text ; target ; ref 1 ; … ; ref K] at a time, CFG's two passes one after
the other) and the VAE decode of the images. The peak is the largest phase. Each phase is counted in bytes as named
terms from the shapes that set it (`RunShape`): tokens × channels of the widest tensors alive at once, pixels ×
channels in the VAE. The constants below are those counts, measured on the CPU (`bench/bench_run_memory.py`:
the estimate is ≥ the measured peak and within 1.5× of it).

Attention: torch's SDPA does not hold the L×L scores on CUDA (flash / memory-efficient kernels) nor on the CPU
(its flash kernel, measured: 5 MiB at L = 8192 where the scores would be 1 GiB); other devices take the math path,
which does (`ATTENTION_SCORES`).

`available_bytes(device)` is what the device has free for it: CUDA's free memory plus what torch's caching allocator
holds unused; on the CPU the lower of /proc/meminfo's MemAvailable and the cgroup's limit less its usage.

`trim_host_heap` gives freed host memory back to the system. glibc's malloc keeps what a process frees for its next
allocations, and can return only the free pages at the top of each heap: one block still in use above a large freed
one pins it. A run makes and drops activations of many sizes, so a long-lived process (a ComfyUI server) holds more
and more freed memory in steps of tens of MiB; ``malloc_trim(0)`` returns every whole free page, wherever it lies.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30

#: Environment: 0 lets a run start although the estimate says it will not fit (the estimate may be off).
CHECK_ENV = "UNIREF_MEMORY_CHECK"
#: Environment: the bytes a run may use, instead of what the device reports (e.g. 12GiB; to leave room for others).
AVAILABLE_ENV = "UNIREF_MEMORY_AVAILABLE"

PHASES = ("prompt", "references", "sampling", "decoding")
#: How the error names a phase.
PHASE_WORDS = {
    "prompt": "to encode the prompt",
    "references": "to encode the references",
    "sampling": "to sample",
    "decoding": "to decode the image",
}

# Values per token and per channel of the transformer's width alive at a block's peak in a forward without
# gradients: the residual streams, their modulated copies, q, k, v and their RoPE'd and joined copies, the MLP's 4×
# hidden state and its activation.
TRANSFORMER_VALUES = 18
# Values per token held beside the blocks whatever the width: RoPE tables (complex, per head channel pair) and the
# 64-channel latents, the velocity of each CFG pass and the sampler's state (fp32).
TOKEN_VALUES = 64 * 8
# On the CPU, a block in bf16 or fp16 holds its weights again in fp32 while it runs (measured at width 1024: 120 MiB
# whatever the tokens, one block's 29 M parameters in fp32).
CPU_HALF_NOTE = "the CPU's half-precision matmuls"
# The math path of attention (devices other than CUDA and CPU): the scores and their softmax, per head.
ATTENTION_SCORES = 2
# VAE activations per pixel and per channel of its base width in an untiled pass: a decode and an encode. Measured:
# 17.5 and 11.9 on the tiny VAE (one residual block per stage); the real VAE (two) grew a CPU process by 2.23 / 4.55
# GiB decoding 512² / 768² in fp32 (README, "Large outputs"): 23.8 and 21.6 per pixel and channel.
VAE_DECODE_VALUES = 24
VAE_ENCODE_VALUES = 16
# torch's CPU convolution takes its slow path (it unfolds each 3×3×3 window into a column buffer) for an fp32 input of
# one image whose channels × frames × rows are at most this; at the full-resolution stage (base channels, 3 frames of
# causal padding) that is a short image or tile with a narrow VAE (tiny models; Qwen-Image's only below 72 px) ...
CPU_SLOW_CONV_SIZE = 20480
# ... and then holds this many values per pixel and base channel, encoding or decoding.
VAE_SLOW_CONV_VALUES = 42
# Tiled passes: diffusers' tile (256 px every 192) of the VAE's pixels; the decoded tiles and the blended result.
VAE_TILE_PX = 256
TILED_VALUES = 3 * ((256 / 192) ** 2 + 2)
# The decoded images made 8-bit: float copies of the pixels (scaled, clamped, rounded) beside the VAE's output.
IMAGE_VALUES = 3 * 3
# The check's margin on the CPU: glibc keeps freed chunks below its mmap threshold (up to 32 MiB) in its arenas, so a
# process with a history (a server after other work, a test session) grows by more than the run's working set: the
# same 512² decode (working set 290 MiB, estimate 393) grew a fresh process by 325 MiB and a pytest process by up to
# 512.
CPU_HEAP_SLACK = 1.5
# Prompt tokens beside the VL tokens, counted before the tokenizer runs: the template's end, "Picture k: " per
# reference, and at most one token per byte of the instruction.
TEMPLATE_TOKENS = 8
PICTURE_LABEL_TOKENS = 6


@dataclass(frozen=True)
class RunShape:
    """The sizes of a loaded model that its run memory depends on (`RunShape.of` reads them off the networks)."""

    width: int  # transformer heads × head width
    heads: int
    vae_base: int  # the VAE's base channels (96 in Qwen-Image's)
    dtype_bytes: int  # of the activations: the pipeline's dtype
    device: str  # "cuda", "cpu", "mps", …
    block_parameters: int = 0  # of one transformer block
    text_hidden: int = 0  # the text encoder's: 0 leaves the prompt phase out
    text_layers: int = 0
    text_intermediate: int = 0
    vocab: int = 0
    vision_hidden: int = 0

    @classmethod
    def of(cls, components, dtype, device) -> RunShape:
        t = getattr(components.transformer, "config", None)
        cfg = getattr(components.text_encoder, "config", None)
        text = getattr(cfg, "text_config", cfg)
        vision = getattr(cfg, "vision_config", None)
        blocks = getattr(components.transformer, "transformer_blocks", None)
        return cls(
            width=getattr(t, "num_attention_heads", 0) * getattr(t, "attention_head_dim", 0),
            heads=getattr(t, "num_attention_heads", 0),
            vae_base=getattr(getattr(components.vae, "config", None), "base_dim", 96),
            dtype_bytes=_element_size(dtype),
            device=str(device).split(":")[0],
            block_parameters=sum(p.numel() for p in blocks[0].parameters()) if blocks else 0,
            text_hidden=getattr(text, "hidden_size", 0),
            text_layers=getattr(text, "num_hidden_layers", 0),
            text_intermediate=getattr(text, "intermediate_size", 0),
            vocab=getattr(text, "vocab_size", 0),
            vision_hidden=getattr(vision, "hidden_size", 0),
        )


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    phase: str
    note: str = ""


@dataclass
class RunEstimate:
    terms: list[Term] = field(default_factory=list)

    def phase_total(self, phase: str) -> int:
        return sum(t.bytes for t in self.terms if t.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.phase_total(self.peak_phase)

    def describe(self) -> str:
        lines = [f"{'term':<36} {'phase':<11} {'MiB':>9}"]
        for t in self.terms:
            note = f"  ({t.note})" if t.note else ""
            lines.append(f"{t.name:<36} {t.phase:<11} {t.bytes / 2**20:>9.1f}{note}")
        lines.append(f"peak: {gib(self.peak)} {PHASE_WORDS[self.peak_phase]}")
        return "\n".join(lines)


def estimate_run(
    plan,
    shape: RunShape,
    *,
    text_tokens: int | None = None,
    prompt_bytes: int = 0,
    num_images: int = 1,
    cfg: float = 1.0,
    tiled: Callable[[int, int], bool] = lambda w, h: False,
    phases=PHASES,
    init_image: bool = False,
    extra: tuple[Term, ...] = (),
) -> RunEstimate:
    """Every term of each of ``phases`` for a run of ``plan`` (`uniref_core.budget.Plan`) making ``num_images``.

    ``text_tokens``: the prompt's conditioning tokens when known (after encoding), else counted from the plan's VL
    tokens and ``prompt_bytes``. ``tiled(width, height)``: whether a VAE pass at that size tiles (the pipeline's
    ``vae_tiling``). ``extra``: terms the caller knows of (weights that offload will move onto the device).
    """
    e = RunEstimate()
    add = e.terms.append
    b = shape.dtype_bytes
    if text_tokens is None:
        text_tokens = TEMPLATE_TOKENS + PICTURE_LABEL_TOKENS * len(plan.references) + prompt_bytes + plan.vl_tokens

    if "prompt" in phases and shape.text_hidden:
        per_token = shape.text_hidden * (shape.text_layers + 1) + shape.vocab + 3 * shape.text_intermediate
        add(Term("text encoder activations", text_tokens * per_token * b, "prompt", f"{text_tokens} tokens"))
        vision = 4 * plan.vl_tokens * shape.vision_hidden * b * 10  # the vision tower: 4 patches per VL token
        add(Term("vision tower activations", vision, "prompt", f"{plan.vl_tokens} VL tokens"))
    if "references" in phases and plan.references:
        largest = max(plan.references, key=lambda r: r.vae[0] * r.vae[1])
        w, h = largest.vae
        add(
            Term(
                "VAE encode", _vae_pass(shape, w, h, "encode", tiled(w, h)), "references", f"reference {largest.index}"
            )
        )

    tokens = plan.sequence_length + text_tokens
    if "sampling" in phases:
        n = num_images
        w, h = plan.output
        if init_image:
            add(Term("VAE encode of the init image", _vae_pass(shape, w, h, "encode", tiled(w, h)), "sampling"))
        acts = n * tokens * shape.width * TRANSFORMER_VALUES * b
        add(Term("transformer activations", acts, "sampling", f"{n} × {tokens} tokens × width {shape.width}"))
        add(Term("RoPE, latents, sampler state", n * tokens * TOKEN_VALUES, "sampling"))
        if shape.device == "cpu" and shape.dtype_bytes == 2:
            add(Term("a block's weights in fp32", 4 * shape.block_parameters, "sampling", CPU_HALF_NOTE))
        if shape.device not in ("cuda", "cpu"):
            scores = n * shape.heads * tokens * tokens * b * ATTENTION_SCORES
            add(Term("attention scores", scores, "sampling", f"the math path on {shape.device}"))
        if cfg > 1:  # the passes run one after the other: only the first one's result waits beside the second
            add(Term("the positive pass's velocity", n * plan.output_tokens * 64 * 4, "sampling"))
    if "decoding" in phases:
        w, h = plan.output
        vae = num_images * _vae_pass(shape, w, h, "decode", tiled(w, h))
        add(Term("VAE decode", vae, "decoding", f"{num_images} × {w}×{h}" + (", tiled" if tiled(w, h) else "")))
        add(Term("8-bit images", num_images * w * h * IMAGE_VALUES * 4, "decoding"))
    e.terms.extend(t for t in extra if t.phase in phases)
    return e


def _vae_pass(shape: RunShape, width: int, height: int, kind: str, tiled: bool) -> int:
    """Bytes of one VAE encode or decode of a ``width``×``height`` image, tiled or not."""
    w, h = (min(width, VAE_TILE_PX), min(height, VAE_TILE_PX)) if tiled else (width, height)
    values = VAE_DECODE_VALUES if kind == "decode" else VAE_ENCODE_VALUES
    slow = shape.device == "cpu" and shape.dtype_bytes == 4 and shape.vae_base * 3 * h <= CPU_SLOW_CONV_SIZE
    if slow:
        values = VAE_SLOW_CONV_VALUES
    one = w * h * values * shape.vae_base * shape.dtype_bytes
    return int(one + (width * height * TILED_VALUES * 4 if tiled else 0))


# --------------------------------------------------------------------------------------------------
# What the device has
# --------------------------------------------------------------------------------------------------


def available_bytes(device) -> int | None:
    """Bytes a run may still take on ``device``: ``UNIREF_MEMORY_AVAILABLE`` when set; on CUDA the free memory plus
    what torch's caching allocator holds unused; on the CPU `cpu_available_bytes`; None where it is not known."""
    import torch

    override = os.environ.get(AVAILABLE_ENV)
    if override:
        return parse_bytes(override)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return cpu_available_bytes()
    return None


def cpu_available_bytes(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """The lower of MemAvailable and what this process's cgroup (v2, else v1) lets it still take: its limit less its
    usage, reclaimable file cache not counted as used. None where neither can be read (not Linux)."""
    found = []
    meminfo = _read(Path(proc) / "meminfo")
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            found.append(int(line.split()[1]) * 1024)
    found += _cgroup_room(Path(proc) / "self" / "cgroup", Path(cgroup_root))
    return min(found) if found else None


def _cgroup_room(cgroup_file: Path, root: Path) -> list[int]:
    """Room under each memory limit of this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``)."""
    rooms = []
    for line in (_read(cgroup_file) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and not controllers:  # v2
            base, limit, usage, inactive = root, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # v1
            base, limit, usage, inactive = (
                root / "memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                ("total_inactive_file"),
            )
        else:
            continue
        rel = Path(path.lstrip("/"))
        # Inside a container the process's cgroup is often mounted as the root itself.
        for folder in [base / rel, *(base / p for p in rel.parents)]:
            room = _room(folder, limit, usage, inactive)
            if room is not None:
                rooms.append(room)
    return rooms


def _room(folder: Path, limit_name: str, usage_name: str, inactive_name: str) -> int | None:
    limit, usage = _read(folder / limit_name), _read(folder / usage_name)
    if limit is None or usage is None or limit.strip() == "max":
        return None
    limit_bytes = int(limit)
    if limit_bytes >= 2**60:  # v1's "no limit"
        return None
    used = int(usage)
    for line in (_read(folder / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == inactive_name:
            used -= int(value)
    return max(0, limit_bytes - used)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


def check_enabled() -> bool:
    return os.environ.get(CHECK_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": GiB, "gib": GiB, "gb": 10**9}


def parse_bytes(text: str) -> int:
    """'12GiB', '512m', '1073741824' → bytes."""
    from .errors import UniRefError

    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in UNITS or not math.isfinite(value) or value < 0:
        raise UniRefError(f"{AVAILABLE_ENV} is {text!r}: give bytes, or a size such as 12GiB or 512MiB")
    return int(value * UNITS[unit])


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _element_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else int(dtype)


# --------------------------------------------------------------------------------------------------
# The largest that fits
# --------------------------------------------------------------------------------------------------


def required(estimate: RunEstimate, device: str) -> int:
    """The bytes the check asks the device to have free for a run of this estimate (`CPU_HEAP_SLACK` on the CPU)."""
    return int(estimate.peak * (CPU_HEAP_SLACK if device == "cpu" else 1))


def refusal(plan, needed: int, phase: str, need: Callable, num_images: int, available: int, device: str) -> str:
    """The error for a run of ``plan`` that needs ``needed`` bytes (`required`, most of them in ``phase``) and does
    not fit ``available``: the largest output (same aspect ratio), reference budget and image count that fit with
    everything else held; when no one change does, a budget and output together. ``need(plan, num_images)``:
    `required` for another plan or count."""

    def fits(p, n=num_images) -> bool:
        return need(p, n) <= available

    fixes = []
    out = largest_output(plan, fits)
    if out is not None:
        fixes.append(f"the largest output that fits is {out.output[0]}×{out.output[1]}: lower width/height")
    smaller = largest_budget(plan, fits)
    if smaller is not None:
        fixes.append(f"at this output the largest budget that fits is {math.isqrt(smaller.budget)}²: lower the budget")
    if num_images > 1:
        n = next((n for n in range(num_images - 1, 0, -1) if fits(plan, n)), None)
        if n is not None:
            fixes.append(f"make {n} image{'s' if n > 1 else ''} per run instead of {num_images}")
    smallest = output_at(*plan.output, 1, plan.token_px)
    for n in sorted({num_images, 1}, reverse=True):
        if fixes:
            break
        smaller = largest_budget(plan, lambda p, n=n: fits(_with_output(p, smallest), n)) or plan
        out = largest_output(smaller, lambda p, n=n: fits(p, n))
        if out is not None:
            changes = [f"output {out.output[0]}×{out.output[1]}"]
            changes += [f"budget {math.isqrt(smaller.budget)}²"] if smaller is not plan else []
            changes += [f"{n} image{'s' if n > 1 else ''} per run"] if n != num_images else []
            fixes.append(f"together, {', '.join(changes)} fit")
    if not fixes:
        fixes.append("no smaller output or budget does: free memory (close other programs) or use a larger device")
    w, h = plan.output
    refs = f" with {len(plan.references)} reference(s) of {plan.reference_tokens} tokens" if plan.references else ""
    images = f" × {num_images} images" if num_images > 1 else ""
    return (
        f"output {w}×{h}{images}{refs} needs ~{gib(needed)} {PHASE_WORDS[phase]} but "
        f"{gib(available)} is free on {device}: {'; '.join(fixes)} (to run anyway, as the estimate may be off, set "
        f"{CHECK_ENV}=0)"
    )


def _with_output(plan, output: tuple[int, int]):
    from dataclasses import replace

    return replace(plan, output=output)


def largest_output(plan, fits: Callable):
    """``plan`` with the largest output below its own, of the same aspect ratio in whole tokens, that ``fits``;
    None when not even one token does."""
    w, h = plan.output
    t = plan.token_px
    for n in range(max(w, h) // t - 1, 0, -1):
        candidate = _with_output(plan, output_at(w, h, n, t))
        if candidate.output != plan.output and fits(candidate):
            return candidate
    return None


def largest_budget(plan, fits: Callable):
    """``plan`` re-allocated at the largest square budget below its own (sides in steps of 2 tokens, as the planner
    rounds) that ``fits``, its output held; None when it has no budget (per_image mode) or none fits."""
    from dataclasses import replace

    from .budget import allocate_budget, tokens_of
    from .errors import UniRefError

    if plan.mode != "budget" or not plan.references or not plan.budget:
        return None
    step = 2 * plan.token_px
    sources = [r.source for r in plan.references]
    for side in range(math.isqrt(plan.budget) // step * step, step - 1, -step):
        if side * side >= plan.budget:
            continue
        try:
            sizes = allocate_budget(sources, side * side, token_px=plan.token_px)
        except UniRefError:  # a reference would fall below the smallest size: no smaller budget works either
            return None
        if sum(tokens_of(*s, plan.token_px) for s in sizes) >= plan.reference_tokens:
            continue  # rounding kept it as large: not a change that helps
        candidate = replace(
            plan, budget=side * side, references=[replace(r, vae=s) for r, s in zip(plan.references, sizes)]
        )
        if fits(candidate):
            return candidate
    return None


def output_at(width: int, height: int, long_tokens: int, token_px: int) -> tuple[int, int]:
    """An output of ``width``×``height``'s aspect ratio whose longer side is ``long_tokens`` tokens (each side a
    multiple of ``token_px``, at least one token)."""
    long_side, short_side = max(width, height), min(width, height)
    short_tokens = max(1, round(long_tokens * short_side / long_side))
    long_px, short_px = long_tokens * token_px, short_tokens * token_px
    return (long_px, short_px) if width >= height else (short_px, long_px)


def trim_host_heap() -> None:
    """Return glibc's free heap pages to the system; nothing where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        pass
