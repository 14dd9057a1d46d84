"""SELF size planning: where every reference lands in pixels and tokens, before any model runs.

Two modes:
- ``budget`` (SELF): one scale for all references so that together they cover at most the pixel
  budget B (plus rounding slack). K references cost ~B/256 tokens whatever K is.
- ``per_image``: each reference at its own ~1024² area, exactly like diffusers'
  ``QwenImageEditPlusPipeline`` (and ComfyUI's ``TextEncodeQwenImageEditPlus``). K references cost
  ~K·4096 tokens. This is how the existing checkpoints were trained.

The VL copies (what Qwen2.5-VL sees) are planned here too, because they add tokens to the text
stream: per image at 384² like the reference pipeline, or all together within a VL budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import UniRefError

# Qwen's ``calculate_dimensions`` rounds each side to this (per_image mode and VL copies keep it).
SIDE_MULTIPLE = 32
# One transformer token covers 2×2 latents. Real checkpoints have an 8× VAE: 16×16 pixels. A model
# with another VAE scale plans with its own token size (``token_px`` below; ``model.token_px_of``);
# SELF then rounds sides to 2 tokens and keeps at least 2 tokens per side, which for 16 px tokens is
# the 32 px of Qwen's rounding.
TOKEN_PX = 16
# No reference may shrink below this many pixels per side (2 tokens): below it, it is a smear.
MIN_SIDE_PX = 2 * TOKEN_PX
# Beyond this aspect ratio a reference is a line, not a picture.
MAX_ASPECT = 64.0
# The reference pipeline's areas (diffusers: VAE_IMAGE_SIZE and CONDITION_IMAGE_SIZE).
PER_IMAGE_AREA = 1024 * 1024
VL_IMAGE_AREA = 384 * 384
# The budgets the model is trained at (SFT stages); any other area is allowed.
BUDGETS = {"1024²": 1024 * 1024, "1536²": 1536 * 1536, "2048²": 2048 * 2048}
DEFAULT_BUDGET = 1024 * 1024
DEFAULT_OUTPUT_AREA = 1024 * 1024
MODES = ("budget", "per_image")
# Qwen2.5-VL: 14 px patches merged 2×2, so one vision token per 28×28 px; its processor's limits.
VL_PATCH_PX = 28
VL_MIN_PIXELS = 56 * 56
VL_MAX_PIXELS = 12845056
# The longest image sequence [target ; refs] the engine runs: a 4096² output plus a 4096² budget at 16 px tokens.
# Beyond it one step takes minutes and tens of GB on any device, and a host's cancel waits for that step.
MAX_SEQUENCE_TOKENS = 2 * (4096 // TOKEN_PX) ** 2
# RoPE positions per axis of the Qwen-Image transformer (diffusers' QwenEmbedRope table). An image n tokens a side
# takes the positions -(n - n//2) … n//2 - 1 of that axis; the text stream takes those from the largest image's half
# side on, so half the longest side plus the prompt's tokens (the VL vision tokens among them) must fit.
ROPE_POSITIONS = 4096
# The fewest text tokens a prompt takes after the dropped system turn: labels, the closing template and a word.
MIN_TEXT_TOKENS = 16
# No image has more pixels than this (2**53, the last integer a float holds exactly); a longer number is a typo, and
# the planner's float arithmetic would overflow on it.
MAX_AREA = 2**53


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``target_area`` pixels at ``ratio`` = w/h, sides multiples of 32.

    Same arithmetic as diffusers' helper of this name, so ``per_image`` sizes match it exactly.
    """
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / SIDE_MULTIPLE) * SIDE_MULTIPLE, round(height / SIDE_MULTIPLE) * SIDE_MULTIPLE


def tokens_of(width: int, height: int, token_px: int = TOKEN_PX) -> int:
    """Transformer tokens of an image of this pixel size (one token = ``token_px``² px, 16² for real models)."""
    return (width // token_px) * (height // token_px)


def vl_tokens_of(width: int, height: int) -> int:
    """Vision tokens Qwen2.5-VL's processor makes of an image of this size (its ``smart_resize``)."""
    h = max(VL_PATCH_PX, round(height / VL_PATCH_PX) * VL_PATCH_PX)
    w = max(VL_PATCH_PX, round(width / VL_PATCH_PX) * VL_PATCH_PX)
    if h * w > VL_MAX_PIXELS:
        beta = math.sqrt((height * width) / VL_MAX_PIXELS)
        h = max(VL_PATCH_PX, math.floor(height / beta / VL_PATCH_PX) * VL_PATCH_PX)
        w = max(VL_PATCH_PX, math.floor(width / beta / VL_PATCH_PX) * VL_PATCH_PX)
    elif h * w < VL_MIN_PIXELS:
        beta = math.sqrt(VL_MIN_PIXELS / (height * width))
        h = math.ceil(height * beta / VL_PATCH_PX) * VL_PATCH_PX
        w = math.ceil(width * beta / VL_PATCH_PX) * VL_PATCH_PX
    return (h // VL_PATCH_PX) * (w // VL_PATCH_PX)


def _is_area(value) -> bool:
    """A pixel area the planner can work with: a positive number up to `MAX_AREA` (not NaN, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_AREA


def _round_side(x: float, token_px: int = TOKEN_PX) -> int:
    multiple = 2 * token_px
    return max(multiple, round(x / multiple) * multiple)


def _check_aspect(sizes: list[tuple[int, int]]) -> None:
    for k, (w, h) in enumerate(sizes, start=1):
        if w <= 0 or h <= 0:
            raise UniRefError(f"reference {k} is {w}×{h} px: it has no pixels; connect a real image")
        if max(w, h) / min(w, h) > MAX_ASPECT:
            raise UniRefError(
                f"reference {k} is {w}×{h} px: aspect ratio beyond 1:{MAX_ASPECT:g} is not supported; "
                "crop it closer to its subject"
            )


def allocate_budget(
    sizes: list[tuple[int, int]], budget: int, upscale: bool = True, token_px: int = TOKEN_PX
) -> list[tuple[int, int]]:
    """SELF allocation: one scale s = sqrt(B / Σ w·h) for all references, aspect and order kept.

    Each side is rounded to a multiple of 2 tokens (32 px for real models), so the total may exceed
    ``budget`` by at most ``rounding_slack(result, token_px)``. With ``upscale=False`` references
    smaller than their share keep their size (rounded). A reference whose short side would fall below
    2 tokens cannot be placed: the error names it and the budget that would fit.
    """
    if not sizes:
        raise UniRefError("no reference images: connect at least one reference")
    if not _is_area(budget):
        raise UniRefError(f"budget is {budget} px: give a positive pixel budget such as 1024*1024")
    _check_aspect(sizes)
    total = sum(w * h for w, h in sizes)
    scale = math.sqrt(budget / total)
    if not upscale:
        scale = min(scale, 1.0)
    min_side, multiple = 2 * token_px, 2 * token_px
    for k, (w, h) in enumerate(sizes, start=1):
        short = min(w, h) * scale
        # Half a multiple below the floor still rounds up onto it; further down it cannot.
        if short < min_side - multiple / 2:
            needed = math.ceil(total * ((min_side - multiple / 2) / min(w, h)) ** 2)
            side = math.ceil(math.sqrt(needed))
            raise UniRefError(
                f"reference {k} is {w}×{h} px: with {len(sizes)} references in a budget of {_fmt_area(budget)} "
                f"its short side would be {short:.0f} px, below the {min_side} px minimum; "
                f"raise the budget to at least {side}² ({needed} px), use fewer references, or crop it"
            )
    return [(_round_side(w * scale, token_px), _round_side(h * scale, token_px)) for w, h in sizes]


def allocate_per_image(sizes: list[tuple[int, int]], area: int = PER_IMAGE_AREA) -> list[tuple[int, int]]:
    """Each reference independently at ~``area`` pixels, as diffusers' QwenImageEditPlusPipeline does."""
    if not sizes:
        raise UniRefError("no reference images: connect at least one reference")
    if not _is_area(area):
        raise UniRefError(f"per-image area is {area} px: give a positive area such as 1024*1024")
    _check_aspect(sizes)
    out = []
    for k, (w, h) in enumerate(sizes, start=1):
        vw, vh = calculate_dimensions(area, w / h)
        if vw < MIN_SIDE_PX or vh < MIN_SIDE_PX:
            raise UniRefError(
                f"reference {k} is {w}×{h} px: at {_fmt_area(area)} per image its short side would be "
                f"below {MIN_SIDE_PX} px; crop it or use mode 'budget' with a larger budget"
            )
        out.append((vw, vh))
    return out


def rounding_slack(allocated: list[tuple[int, int]], token_px: int = TOKEN_PX) -> int:
    """Most pixels that rounding each side to the nearest 2 tokens (32 px) can add over the exact budget."""
    half = token_px
    return sum(half * (w + h) + half * half for w, h in allocated)


def allocate_vl(sizes: list[tuple[int, int]], vl_budget: int | None) -> list[tuple[int, int]]:
    """Sizes of the small copies the VL encoder sees: 384² each, or all within ``vl_budget``."""
    if vl_budget is None:
        return [calculate_dimensions(VL_IMAGE_AREA, w / h) for w, h in sizes]
    if not _is_area(vl_budget):
        raise UniRefError(f"vl_budget is {vl_budget} px: give a positive area such as 384*384, or leave it unset")
    total = sum(w * h for w, h in sizes)
    scale = math.sqrt(vl_budget / total)
    return [(_round_side(w * scale), _round_side(h * scale)) for w, h in sizes]


@dataclass(frozen=True)
class ReferencePlan:
    """Where one reference lands: its source size, its VAE size and its VL-copy size."""

    index: int  # 1-based, the "Picture k" label
    source: tuple[int, int]
    vae: tuple[int, int]
    vl: tuple[int, int]
    token_px: int = TOKEN_PX

    @property
    def tokens(self) -> int:
        return tokens_of(*self.vae, self.token_px)

    @property
    def vl_tokens(self) -> int:
        return vl_tokens_of(*self.vl)


@dataclass(frozen=True)
class Plan:
    """The whole SELF layout of one edit: target first, then each reference in order."""

    mode: str
    budget: int | None
    output: tuple[int, int]
    references: list[ReferencePlan] = field(default_factory=list)
    #: Pixels per token side: 16 for real checkpoints (8× VAE, 2×2 patches); the model's own otherwise.
    token_px: int = TOKEN_PX

    @property
    def output_tokens(self) -> int:
        return tokens_of(*self.output, self.token_px)

    @property
    def reference_tokens(self) -> int:
        return sum(r.tokens for r in self.references)

    @property
    def vl_tokens(self) -> int:
        return sum(r.vl_tokens for r in self.references)

    @property
    def sequence_length(self) -> int:
        """Image tokens in the joint sequence [target ; ref 1 ; … ; ref K] (text comes on top)."""
        return self.output_tokens + self.reference_tokens

    @property
    def text_position(self) -> int:
        """The first RoPE position of the text stream: half the longest side, in tokens, of any image."""
        return max(max(rows // 2, cols // 2) for _, rows, cols in self.img_shapes)

    @property
    def text_room(self) -> int:
        """How many text tokens (the prompt's encoding, the VL vision tokens included) the transformer's RoPE holds."""
        return ROPE_POSITIONS - self.text_position

    @property
    def img_shapes(self) -> list[tuple[int, int, int]]:
        """(frames, rows, cols) in token units per image, target first: what the transformer's RoPE reads."""
        t = self.token_px
        shapes = [(1, self.output[1] // t, self.output[0] // t)]
        shapes += [(1, r.vae[1] // t, r.vae[0] // t) for r in self.references]
        return shapes

    def summary(self) -> str:
        refs = ", ".join(f"{r.index}: {r.vae[0]}×{r.vae[1]} ({r.tokens} tok)" for r in self.references)
        return (
            f"output {self.output[0]}×{self.output[1]} ({self.output_tokens} tok); references [{refs}]; "
            f"reference tokens {self.reference_tokens}; VL tokens {self.vl_tokens}; "
            f"image sequence {self.sequence_length} tokens"
        )

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "budget": self.budget,
            "token_px": self.token_px,
            "output": {"width": self.output[0], "height": self.output[1], "tokens": self.output_tokens},
            "references": [
                {
                    "picture": r.index,
                    "source": list(r.source),
                    "width": r.vae[0],
                    "height": r.vae[1],
                    "tokens": r.tokens,
                    "vl_size": list(r.vl),
                    "vl_tokens": r.vl_tokens,
                }
                for r in self.references
            ],
            "reference_tokens": self.reference_tokens,
            "vl_tokens": self.vl_tokens,
            "sequence_length": self.sequence_length,
        }


def output_size(
    sizes: list[tuple[int, int]],
    width: int | None = None,
    height: int | None = None,
    match_ref: int = 1,
    area: int = DEFAULT_OUTPUT_AREA,
    token_px: int = TOKEN_PX,
) -> tuple[int, int]:
    """The target size: explicit ``width``×``height`` (multiples of the token size, 16 px for real
    models), or reference ``match_ref``'s aspect ratio at ``area`` pixels."""
    t = token_px
    if (width is None) != (height is None):
        raise UniRefError("give both width and height for an explicit output size, or neither to match a reference")
    if width is not None:
        for name, v in (("width", width), ("height", height)):
            if v < t or v % t:
                raise UniRefError(
                    f"output {name} is {v} px: it must be a positive multiple of {t}; try {max(t, round(v / t) * t)} "
                    f"(one token is {t} px for this model)"
                )
        return int(width), int(height)
    if not sizes:
        raise UniRefError("no reference to take the output size from: give width and height")
    if not 1 <= match_ref <= len(sizes):
        raise UniRefError(f"match_ref is {match_ref} but there are {len(sizes)} references: pick 1…{len(sizes)}")
    if not _is_area(area):
        raise UniRefError(f"output area is {area} px: give a positive area such as 1024*1024")
    w, h = sizes[match_ref - 1]
    cw, ch = calculate_dimensions(area, w / h)
    return max(t, cw // t * t), max(t, ch // t * t)


def plan_references(
    sizes: list[tuple[int, int]],
    mode: str = "budget",
    budget: int = DEFAULT_BUDGET,
    *,
    upscale: bool = True,
    per_image_area: int = PER_IMAGE_AREA,
    vl_budget: int | None = None,
    width: int | None = None,
    height: int | None = None,
    match_ref: int = 1,
    output_area: int = DEFAULT_OUTPUT_AREA,
    token_px: int = TOKEN_PX,
) -> Plan:
    """The one planner used by the CLI, the nodes and the trainers. ``token_px``: the model's token
    side in pixels (``model.token_px_of``); 16, the default, is every real Qwen-Image-Edit checkpoint."""
    if mode not in MODES:
        raise UniRefError(f"mode is {mode!r}: use one of {', '.join(MODES)}")
    check_token_px(token_px)
    if mode == "budget":
        vae = allocate_budget(sizes, budget, upscale=upscale, token_px=token_px)
    else:
        vae = allocate_per_image(sizes, per_image_area)
    vl = allocate_vl(sizes, vl_budget)
    out = output_size(sizes, width, height, match_ref, output_area, token_px=token_px)
    refs = [ReferencePlan(k, s, v, c, token_px) for k, (s, v, c) in enumerate(zip(sizes, vae, vl), start=1)]
    plan = Plan(mode=mode, budget=budget if mode == "budget" else None, output=out, references=refs, token_px=token_px)
    check_sequence(plan)
    return plan


def check_sequence(plan: Plan) -> None:
    """Refuse a plan whose image sequence is longer than the engine runs (`MAX_SEQUENCE_TOKENS`), naming the part
    that is too large: the output size or the references (budget, or per_image mode's count); then one that leaves
    the prompt no RoPE positions (`check_text_room`)."""
    if plan.sequence_length <= MAX_SEQUENCE_TOKENS:
        check_text_room(plan)
        return
    w, h = plan.output
    fix = (
        "lower width and height (or the output area)"
        if plan.output_tokens >= plan.reference_tokens
        else "lower the budget"
        if plan.mode == "budget"
        else "use fewer references or mode 'budget'"
    )
    raise UniRefError(
        f"output {w}×{h} px ({plan.output_tokens} tokens) and references of {plan.reference_tokens} tokens make an "
        f"image sequence of {plan.sequence_length} tokens; the engine runs at most {MAX_SEQUENCE_TOKENS} (a 4096² "
        f"output and a 4096² budget at 16 px tokens): {fix}"
    )


def check_text_room(plan: Plan) -> None:
    """Refuse a plan whose longest image side and VL vision tokens leave no room for a prompt in the transformer's
    `ROPE_POSITIONS` (a very long, thin output or reference, or a huge VL budget), naming which."""
    if plan.vl_tokens + MIN_TEXT_TOKENS <= plan.text_room:
        return
    t = plan.token_px
    sides = [("the output", plan.output)] + [(f"reference {r.index}", r.vae) for r in plan.references]
    name, (w, h) = max(sides, key=lambda s: max(s[1]))
    if plan.text_position > ROPE_POSITIONS // 2:
        longest = 2 * (ROPE_POSITIONS - plan.vl_tokens - MIN_TEXT_TOKENS) * t
        fix = f"make {name} less long and thin (at most {longest} px on its longest side, less with a long prompt)"
    else:
        fix = "lower the VL budget (vl_budget)"
    raise UniRefError(
        f"{name} is {w}×{h} px ({max(w, h) // t} tokens on its longest side) and the VL copies make {plan.vl_tokens} "
        f"vision tokens: the prompt starts at RoPE position {plan.text_position} of the model's {ROPE_POSITIONS} and "
        f"the vision tokens alone leave it no room: {fix}"
    )


def check_token_px(token_px: int) -> None:
    """A token side the planner can work with: a power of two that divides Qwen's 32 px rounding."""
    if not isinstance(token_px, int) or token_px < 2 or token_px & (token_px - 1) or SIDE_MULTIPLE % token_px:
        raise UniRefError(f"token size {token_px!r} px: the planner supports powers of two from 2 to {SIDE_MULTIPLE}")


def parse_area(text: str | int) -> int:
    """'1024' → 1024², '1536x1024' → 1536·1024, '1048576' (≥ 65536) → as is. A negative side is refused: squared
    it would pass for a size."""
    s = str(text).strip().lower().replace("²", "").replace("×", "x").replace("*", "x")
    try:
        if isinstance(text, bool):  # JSON's true is no size, though Python counts it as 1
            raise ValueError(text)
        sides = [text] if isinstance(text, int) else [int(v) for v in s.split("x", 1)]
        if any(v < 0 for v in sides):
            raise ValueError(text)
    except ValueError:
        raise UniRefError(
            f"budget {text!r} is not a size: write 1024 (for 1024²), 1536x1024 or a pixel count"
        ) from None
    if len(sides) == 2:
        return sides[0] * sides[1]
    return sides[0] * sides[0] if sides[0] < 65536 else sides[0]


def _fmt_area(area: int) -> str:
    side = math.isqrt(int(area))
    return f"{side}²" if side * side == area else f"{area} px"
