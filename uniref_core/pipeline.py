"""The UniRef edit pipeline: references + instruction → image, in separate steps training reuses.

1. ``encode``: plan sizes (SELF budget or per-image), encode the prompt with the references' VL
   copies, VAE-encode each reference at its planned size → a ``SelfConditioning``.
2. ``sample``: initial noise per seed (CPU fp32, as diffusers draws it), the flow schedule, one
   transformer call per step on [target ; ref 1 ; … ; ref K] with true CFG, Euler or SDE steps.
3. ``decode``: target tokens → VAE → RGB images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from PIL import Image

from . import budget as budget_mod
from . import memory
from .budget import Plan, plan_references
from .cancel import ShouldCancel, cancel_points
from .encoding import encode_image, encode_references, prompt_room, vl_copies
from .errors import UniRefError
from .images import load_image
from .latents import (
    build_sequence,
    latent_stats,
    pack_latents,
    to_images,
    to_pixels,
    unpack_latents,
    vae_decode,
    vae_encode,
    vae_tiling,
)
from .model import Components, load_components
from .prompt import PromptEmbeds, check_prompt_text, encode_prompt
from .sampling import DenoiseStep, Schedule, denoise_steps, flow_schedule, noise_latents, true_cfg

DEFAULT_STEPS = 30
DEFAULT_CFG = 4.0
DEFAULT_NEGATIVE = " "
DEFAULT_ETA = 0.7
#: What a setting left as None becomes when the model folder's ``uniref.json`` does not name it.
BUILTIN_DEFAULTS = {
    "steps": DEFAULT_STEPS,
    "cfg": DEFAULT_CFG,
    "budget": budget_mod.DEFAULT_BUDGET,
    "vl_budget": None,  # 384² per reference, like the reference pipeline
    "output_area": budget_mod.DEFAULT_OUTPUT_AREA,
}


#: the big networks that offload keeps off the execution device (model offload: one at a time there)
MODEL_OFFLOADED = ("text_encoder", "transformer")

#: ``UniRefPipeline.vae_tiling``: diffusers' tiled VAE passes always, never, or for images above VAE_TILING_AREA
VAE_TILING = ("auto", "on", "off")
# An untiled real-width Qwen VAE decode grows ~7.4 GiB per megapixel in fp32 (half in bf16; tiled ~0.8 GiB at any
# size): up to 2 MP (every default ~1024² output, Qwen-Image's 1328² and 1664×928) it runs as diffusers' pipeline does.
VAE_TILING_AREA = 2 * 1024 * 1024


def use_vae_tiling(setting: str, width: int, height: int) -> bool:
    """Whether a VAE pass over a ``width``×``height`` image tiles under ``setting`` (one of VAE_TILING)."""
    if setting not in VAE_TILING:
        raise UniRefError(f"vae_tiling is {setting!r}: use one of {', '.join(VAE_TILING)}")
    return setting == "on" or (setting == "auto" and width * height > VAE_TILING_AREA)


def resolve_setting(name: str, value, model_defaults: dict, references: int | None = None):
    """``value``, or when None the model's default (its uniref.json), else BUILTIN_DEFAULTS. With ``references``
    (K), the model's "by_references" entry with the largest K' ≤ K that sets ``name`` wins over its plain default."""
    if value is not None:
        return value
    found = model_defaults.get(name)
    if references is not None:
        by_refs = model_defaults.get("by_references", {})
        ks = sorted((int(k) for k, sizes in by_refs.items() if name in sizes and int(k) <= references), reverse=True)
        if ks:
            found = by_refs[str(ks[0])][name]
    if found is None:
        return BUILTIN_DEFAULTS[name]
    return float(found) if name == "cfg" else int(found)


SAMPLERS = ("ode", "sde")
MAX_STEPS = 1000
MAX_CFG = 30.0
MAX_IMAGES = 64
# torch.Generator.manual_seed takes 64-bit seeds; image i of a run uses seed + i, so the last one must fit too.
MAX_SEED = 0xFFFFFFFFFFFFFFFF
# Pixels of the synthetic image the latent→RGB preview map is fitted on (one cheap VAE encode).
PREVIEW_FIT_PX = 128


@dataclass
class SelfConditioning:
    """Everything the sampler needs from the references and the prompt, on the model's device."""

    plan: Plan
    positive: PromptEmbeds
    negative: PromptEmbeds | None
    ref_tokens: list[torch.Tensor] = field(default_factory=list)  # packed latents [1, L_k, 64] per reference

    @property
    def width(self) -> int:
        return self.plan.output[0]

    @property
    def height(self) -> int:
        return self.plan.output[1]

    @property
    def output_tokens(self) -> int:
        return self.plan.output_tokens

    def to(self, device, dtype) -> SelfConditioning:
        """The same conditioning on another device (the model may have moved since encoding)."""
        return SelfConditioning(
            plan=self.plan,
            positive=self.positive.to(device, dtype),
            negative=None if self.negative is None else self.negative.to(device, dtype),
            ref_tokens=[r.to(device, dtype) for r in self.ref_tokens],
        )


@dataclass
class StepInfo:
    """Handed to ``on_step`` after each denoising step."""

    step: int  # 1-based
    total: int
    sigma: float
    latents: torch.Tensor  # packed target tokens after this step [N, L, 64]
    x0: torch.Tensor  # the model's current clean-image estimate, packed
    width: int
    height: int


@dataclass
class EditResult:
    images: list[Image.Image]
    plan: Plan
    seconds: float
    latents: torch.Tensor

    def summary(self) -> str:
        per_ref = " ".join(f"ref{r.index}={r.tokens}" for r in self.plan.references)
        return (
            f"{len(self.images)} image(s) {self.plan.output[0]}×{self.plan.output[1]} | "
            f"tokens/ref: {per_ref or '-'} | "
            f"VL tokens {self.plan.vl_tokens} | sequence {self.plan.sequence_length} image tokens | "
            f"{self.seconds:.2f} s"
        )


def _check_range(name: str, value, lo, hi, hint: str) -> None:
    if not (lo <= value <= hi):
        raise UniRefError(f"{name} is {value}: it must be between {lo} and {hi}; {hint}")


def predict_velocity(transformer, x, timestep, ref_tokens, embeds, mask, img_shapes) -> torch.Tensor:
    """One transformer call on the SELF sequence [x ; ref 1 ; … ; ref K]; the target part of the output.

    ``x`` [B, L, 64] target tokens, ``timestep`` σ·1000 (scalar or [B]), ``ref_tokens`` packed
    reference latents ([1 or B, L_k, 64] each), ``embeds``/``mask`` the prompt encoding [B, T, D] / [B, T]
    or None, ``img_shapes`` one layout per sample (all equal: RoPE is built from the first).
    Sampling and training both call this, so they cannot drift apart.
    """
    b, length = x.shape[0], x.shape[1]
    seq = build_sequence(x, ref_tokens)
    t = torch.as_tensor(timestep, device=x.device).expand(b).to(x.dtype) / 1000
    out = transformer(
        hidden_states=seq,
        timestep=t,
        encoder_hidden_states=embeds,
        encoder_hidden_states_mask=mask,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]
    return out[:, :length]


def check_sampling(steps, cfg, sampler, eta, denoise, init_image, num_images) -> None:
    """Validate sampling options up front, so a typo fails before any model work."""
    _check_range("steps", steps, 1, MAX_STEPS, "30 to 50 is typical")
    _check_range("cfg", cfg, 1.0, MAX_CFG, "1 turns guidance off; 4 is typical")
    _check_range("denoise", denoise, 1e-6, 1.0, "1 starts from pure noise; lower keeps more of the init image")
    _check_range("num_images", num_images, 1, MAX_IMAGES, "make fewer images per run")
    if sampler not in SAMPLERS:
        raise UniRefError(f"sampler is {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if sampler == "sde":
        _check_range("eta", eta, 1e-6, 2.0, "0.7 is typical")
    if denoise < 1 and init_image is None:
        raise UniRefError("denoise < 1 needs an init image to start from: give one, or set denoise to 1")
    if denoise < 1 and int(max(steps - steps * denoise, 0)) >= steps:
        raise UniRefError(f"denoise {denoise} with {steps} steps leaves no step to run: raise denoise or steps")


def check_seed(seed, num_images: int = 1) -> None:
    """A whole number from 0 such that every image's seed (``seed`` … ``seed + num_images - 1``) fits the 64 bits
    of torch's generators."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UniRefError(f"seed is {seed!r}: give a whole number from 0 to {MAX_SEED}")
    top = MAX_SEED - (num_images - 1)
    if not 0 <= seed <= top:
        more = f" (image i of {num_images} uses seed + i)" if num_images > 1 else ""
        raise UniRefError(
            f"seed is {seed}: it must be between 0 and {top}{more}, the 64 bits of the noise generator; "
            "give a seed in that range"
        )


@dataclass(frozen=True)
class SamplingOptions:
    """How to denoise: what the sampler node, the CLI, ``edit`` and RL rollouts hand to ``sample``.

    ``steps`` / ``cfg`` None take the model's defaults (`UniRefPipeline.sampling_options`). Image i of
    ``num_images`` uses seed ``seed + i``. ``sde_window`` (sampler "sde" only): the run's steps
    [first, stop) (0-based) that take the stochastic step, the others the ODE one; None: all of them.
    """

    seed: int = 0
    steps: int | None = None
    cfg: float | None = None
    sampler: str = "ode"
    eta: float = DEFAULT_ETA
    denoise: float = 1.0
    num_images: int = 1
    sde_window: tuple[int, int] | None = None

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @property
    def start(self) -> int:
        """The schedule step a run starts at (> 0 when denoise < 1 keeps part of an init image)."""
        return int(max(self.steps - self.steps * self.denoise, 0)) if self.denoise < 1 else 0

    @property
    def sde_steps(self) -> range:
        """The run-relative steps that take the SDE step."""
        if self.sampler != "sde":
            return range(0)
        return range(*self.sde_window) if self.sde_window is not None else range(self.steps)

    def check(self, init_image=None) -> None:
        """Clear errors for out-of-range values (``steps`` and ``cfg`` must be resolved first)."""
        if self.steps is None or self.cfg is None:
            raise UniRefError("steps and cfg are unset: resolve the options against a model first")
        check_sampling(self.steps, self.cfg, self.sampler, self.eta, self.denoise, init_image, self.num_images)
        check_seed(self.seed, self.num_images)
        if self.sde_window is not None:
            first, stop = self.sde_window
            total = self.steps - self.start
            if self.sampler != "sde":
                raise UniRefError(f"sde_window is set but sampler is {self.sampler!r}: use sampler 'sde' or drop it")
            if not (0 <= first < stop <= total):
                raise UniRefError(
                    f"sde_window is {self.sde_window}: give [first, stop) with 0 ≤ first < stop ≤ "
                    f"{total} (the steps this run takes)"
                )


def _sampling_overrides(options: SamplingOptions | None, overrides: dict, where: str) -> SamplingOptions:
    unknown = sorted(set(overrides) - SamplingOptions.names())
    if unknown:
        raise TypeError(
            f"{where}() got unknown sampling option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(SamplingOptions.names()))}"
        )
    return replace(options or SamplingOptions(), **overrides)


def _sampling_memory(cond: SelfConditioning, opts: SamplingOptions, phases: tuple[str, ...]) -> dict:
    """`memory.estimate_run`'s options for sampling ``cond`` with ``opts``."""
    text_tokens = max(p.embeds.shape[1] for p in (cond.positive, cond.negative) if p is not None)
    return dict(
        phases=phases, text_tokens=text_tokens, num_images=opts.num_images, cfg=opts.cfg, init_image=opts.denoise < 1
    )


def _bytes_of(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def draw_noise(
    seed: int, channels: int, width: int, height: int, vae_scale: int
) -> tuple[torch.Tensor, torch.Generator]:
    """Initial noise for one image, drawn on the CPU in fp32 exactly as diffusers draws it; packed."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    h, w = height // vae_scale, width // vae_scale
    noise = torch.randn((1, 1, channels, h, w), generator=gen, dtype=torch.float32)
    return pack_latents(noise.view(1, channels, h, w)), gen


class UniRefPipeline:
    """A loaded Qwen-Image-Edit-family model with SELF encoding and sampling."""

    def __init__(self, components: Components):
        self.c = components
        self._preview_map: torch.Tensor | None = None
        self._lora = None  # a LoraPatcher once a LoRA was applied
        self.offload = "none"
        self._execution_device: torch.device | None = None  # set by enable_block_offload / enable_model_offload
        self._offload_device: torch.device | None = None
        self._resident: str | None = None  # model offload: the network on the execution device now
        self.vae_tiling = "auto"

    def enable_block_offload(self, device, offload_device="cpu") -> None:
        """Run on ``device`` with the two big networks kept on ``offload_device`` (for GPUs smaller than the
        model): the transformer moves there one block at a time as it runs (diffusers' block-level group
        offloading), the text encoder one layer at a time (leaf level); the VAE, small, sits on ``device``.
        Peak GPU memory is then about one transformer block plus activations, at the cost of copying the weights
        over once per denoising step. LoRAs still merge (into the offloaded weights)."""
        from diffusers.hooks import apply_group_offloading

        device, offload_device = self._start_offload("blocks", device, offload_device)
        # No CUDA streams: with streams diffusers keeps pinned copies of the weights, which a LoRA merge would
        # leave stale.
        apply_group_offloading(
            self.c.transformer,
            onload_device=device,
            offload_device=offload_device,
            offload_type="block_level",
            num_blocks_per_group=1,
        )
        apply_group_offloading(
            self.c.text_encoder, onload_device=device, offload_device=offload_device, offload_type="leaf_level"
        )

    def _start_offload(self, mode: str, device, offload_device) -> tuple[torch.device, torch.device]:
        """What both offload modes share: one mode per model, the big networks resting on ``offload_device``,
        the VAE on ``device``, sampling on ``device``."""
        device, offload_device = torch.device(device), torch.device(offload_device)
        if self.offload != "none":
            raise UniRefError(f"{self.offload} offload is already enabled on this model")
        for name in MODEL_OFFLOADED:
            getattr(self.c, name).to(offload_device)
        self.c.vae.to(device)
        self._execution_device, self._offload_device = device, offload_device
        self.offload = mode
        return device, offload_device

    def enable_model_offload(self, device, offload_device="cpu") -> None:
        """Run on ``device`` with one big network there at a time (diffusers' model CPU offload, for GPUs that
        hold the transformer but not the transformer and the text encoder together): the text encoder moves
        to ``device`` when a prompt is encoded and the transformer when sampling starts, each sending the other
        back to ``offload_device`` first, and the transformer leaves again before the VAE decodes; the VAE, small,
        sits on ``device``. Peak GPU memory is the larger network, and each moves once per edit rather than once per
        step (block offload's cost)."""
        self._start_offload("model", device, offload_device)

    def _onload(self, name: str | None) -> None:
        """Model offload: ``name`` (text_encoder / transformer) onto the execution device, the other off it;
        None (VAE decode) sends both off, so decoding a large image has the device to itself."""
        if self.offload != "model" or self._resident == name:
            return
        if self._resident is not None:  # first out, then in: the GPU never holds both
            getattr(self.c, self._resident).to(self._offload_device)
        if name is not None:
            getattr(self.c, name).to(self._execution_device)
        self._resident = name

    @property
    def vae_tiling(self) -> str:
        """auto / on / off: whether VAE encodes and decodes use diffusers' tiling (see VAE_TILING_AREA)."""
        return self._vae_tiling

    @vae_tiling.setter
    def vae_tiling(self, setting: str) -> None:
        use_vae_tiling(setting, 0, 0)  # a bad value fails here, not at the end of sampling
        self._vae_tiling = setting

    def _vae_pass(self, width: int, height: int):
        """The VAE tiled or not for one encode / decode of a ``width``×``height`` image, as ``vae_tiling`` says."""
        return vae_tiling(self.c.vae, use_vae_tiling(self.vae_tiling, width, height))

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype="auto") -> UniRefPipeline:
        return cls(load_components(path, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        """Where sampling runs (with block offload, not where the transformer's weights rest)."""
        return self._execution_device or (self.c.transformer or self.c.vae).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's dtype (without one, encoding only, the VAE's: ``denoise`` casts to the transformer's)."""
        return (self.c.transformer or self.c.vae).dtype

    @property
    def latent_channels(self) -> int:
        return self.c.transformer.config.in_channels // 4

    @property
    def vae_scale(self) -> int:
        return self.c.vae_scale

    @property
    def token_px(self) -> int:
        """Pixels per token side: 16 for real checkpoints; output sides must be multiples of it."""
        return self.c.token_px

    @property
    def loras(self) -> tuple:
        """The ``(LoraWeights, strength)`` pairs merged into the transformer now."""
        return self._lora.active if self._lora is not None else ()

    def set_loras(self, loras) -> int:
        """Make the transformer carry exactly these ``(LoraWeights or path, strength)`` LoRAs (`uniref_core.lora`):
        merged into its weights, and taken out again (the originals restored) by a later call without them.
        Returns the number of layers that carry a LoRA."""
        from .lora import LoraPatcher, LoraWeights, read_lora

        pairs = [(lw if isinstance(lw, LoraWeights) else read_lora(lw), float(s)) for lw, s in loras]
        if self._lora is None:
            if not pairs:
                return 0
            self._lora = LoraPatcher(self.c.transformer)
        return self._lora.apply(pairs)

    def setting(self, name: str, value, references: int | None = None):
        """``value``, or when None the model folder's default for ``name`` with ``references`` references
        (``uniref.json``), else ours."""
        return resolve_setting(name, value, self.c.defaults, references)

    # 1. SELF encoding -------------------------------------------------------------------------

    def plan(self, references, **options) -> Plan:
        images = [load_image(r, name=f"reference {k}") for k, r in enumerate(references, start=1)]
        return plan_references([im.size for im in images], token_px=self.token_px, **options)

    @torch.no_grad()
    def encode(
        self,
        references,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        cfg: float | None = None,
        mode: str = "budget",
        budget: int | None = None,
        upscale: bool = True,
        per_image_area: int = budget_mod.PER_IMAGE_AREA,
        vl_budget: int | None = None,
        width: int | None = None,
        height: int | None = None,
        match_ref: int = 1,
        output_area: int | None = None,
        is_cancelled: ShouldCancel | None = None,
        num_images: int = 1,
    ) -> SelfConditioning:
        """References (paths, PIL, numpy, ComfyUI tensors) + prompt → SELF conditioning.

        The negative prompt is encoded only when ``cfg`` > 1 (it is unused otherwise). ``cfg``,
        ``budget``, ``vl_budget`` and ``output_area`` left as None take the model folder's defaults
        (``uniref.json``), else the built-in ones (1024² budget and output, 384² per VL copy).
        ``is_cancelled``: asked before every text-encoder layer and VAE stage (`uniref_core.cancel`).
        A plan whose run (encoding, sampling ``num_images`` and decoding) needs more memory than the device has is
        refused before any network runs (`check_memory`).
        """
        if not isinstance(prompt, str):
            raise UniRefError(f"prompt must be text, got {type(prompt).__name__}")
        check_prompt_text(prompt, "prompt")
        if negative_prompt is not None:
            check_prompt_text(negative_prompt, "negative prompt")
        references = list(references or [])
        images = [load_image(r, name=f"reference {k}") for k, r in enumerate(references, start=1)]
        cfg = self.setting("cfg", cfg)
        budget = self.setting("budget", budget, len(images))
        vl_budget = self.setting("vl_budget", vl_budget, len(images))
        output_area = self.setting("output_area", output_area, len(images))
        if not images and (width is None or height is None):
            raise UniRefError("no reference images: connect at least one reference (or give width and height)")
        t = self.token_px
        for name, v in (("width", width), ("height", height)):
            if v is not None and (v < t or v % t):
                raise UniRefError(
                    f"output {name} is {v} px: {self.c.path.name} makes images in {t} px tokens, so give a "
                    f"multiple of {t}; try {max(t, round(v / t) * t)}"
                )
        plan = (
            plan_references(
                [im.size for im in images],
                mode,
                budget,
                upscale=upscale,
                per_image_area=per_image_area,
                vl_budget=vl_budget,
                width=width,
                height=height,
                match_ref=match_ref,
                output_area=output_area,
                token_px=t,
            )
            if images
            else Plan(mode=mode, budget=None, output=budget_mod.output_size([], width, height, token_px=t), token_px=t)
        )
        budget_mod.check_sequence(plan)
        prompt_bytes = max(len(prompt.encode()), len((negative_prompt or "").encode()) if cfg > 1 else 0)
        self.check_memory(
            plan,
            self._vae_device,
            phases=self._encode_checks(),
            prompt_bytes=prompt_bytes,
            num_images=num_images,
            cfg=cfg,
        )
        vl_images = vl_copies(images, plan)
        self._onload("text_encoder")
        te = self.c.text_encoder
        te_device = self._execution_device or te.device
        room = prompt_room(te, plan)
        with cancel_points(is_cancelled, [te], "while encoding the prompt"):
            positive = encode_prompt(te, self.c.processor, prompt, vl_images, device=te_device, max_tokens=room)
            negative = None
            if cfg > 1:
                neg_text = DEFAULT_NEGATIVE if negative_prompt is None else negative_prompt
                negative = encode_prompt(
                    te,
                    self.c.processor,
                    neg_text,
                    vl_images,
                    device=te_device,
                    max_tokens=room,
                    name="negative prompt",
                )

        @contextmanager
        def around(r):
            with (
                self._vae_pass(*r.vae),
                cancel_points(is_cancelled, [self.c.vae], f"while encoding reference {r.index}"),
            ):
                yield

        ref_tokens = encode_references(self.c.vae, images, plan, around)
        return SelfConditioning(
            plan=plan,
            positive=positive.to(self.device, self.dtype),
            negative=None if negative is None else negative.to(self.device, self.dtype),
            ref_tokens=[t.to(self.device, self.dtype) for t in ref_tokens],
        )

    # Memory -----------------------------------------------------------------------------------

    def memory_estimate(self, plan: Plan, device=None, **options) -> memory.RunEstimate:
        """The peak memory a run of ``plan`` takes on ``device`` (default: where sampling runs) beyond the weights
        loaded there (`memory.estimate_run`; ``options``: its keyword arguments)."""
        return self._estimator(device)(plan, **options)

    def memory_required(self, plan: Plan, device=None, **options) -> int:
        """The bytes `check_memory` asks ``device`` to have free for a run of ``plan`` (what a host frees first)."""
        device = torch.device(device) if device is not None else self.device
        return memory.required(self.memory_estimate(plan, device, **options), device.type)

    def _estimator(self, device=None) -> Callable[..., memory.RunEstimate]:
        shape = memory.RunShape.of(self.c, self.dtype, device if device is not None else self.device)
        extra, setting = self._offload_terms(), self.vae_tiling

        def estimate(plan: Plan, **options) -> memory.RunEstimate:
            tiled = lambda w, h: use_vae_tiling(setting, w, h)  # noqa: E731
            return memory.estimate_run(plan, shape, tiled=tiled, extra=extra, **options)

        return estimate

    def sample_memory_required(self, cond: SelfConditioning, options: SamplingOptions, device=None) -> int:
        """`memory_required` for sampling ``cond`` with ``options`` and decoding all its images at once (what the
        sampler node asks ComfyUI to free before it loads the transformer)."""
        opts = self.sampling_options(options)
        return self.memory_required(cond.plan, device, **_sampling_memory(cond, opts, ("sampling", "decoding")))

    def check_memory(self, plan: Plan, device=None, **options) -> None:
        """Refuse a run of ``plan`` whose estimate exceeds what ``device`` (default: where sampling runs) has free
        (`memory.available_bytes`), naming the largest output, budget and image count that would fit.
        ``UNIREF_MEMORY_CHECK=0`` skips it."""
        if not memory.check_enabled():
            return
        device = torch.device(device) if device is not None else self.device
        available = memory.available_bytes(device)
        if available is None:
            return
        estimate = self._estimator(device)
        run = estimate(plan, **options)
        needed = memory.required(run, device.type)
        if needed <= available:
            return

        def need(p: Plan, num_images: int) -> int:
            return memory.required(estimate(p, **{**options, "num_images": num_images}), device.type)

        num_images = options.get("num_images", 1)
        raise UniRefError(memory.refusal(plan, needed, run.peak_phase, need, num_images, available, device.type))

    def _encode_checks(self) -> tuple[str, ...]:
        """The phases ``encode`` checks: the whole run where the transformer will sample on the device encoding runs
        on (or offload brings it there); only the encoding where it has no transformer (training's encoding pass) or
        a host has left it elsewhere for now (ComfyUI: its sampler node loads it, evicting the text encoder, and checks
        then)."""
        transformer = self.c.transformer
        if transformer is not None and (self._execution_device is not None or transformer.device == self._vae_device):
            return memory.PHASES
        return ("prompt", "references")

    @property
    def _vae_device(self) -> torch.device:
        """Where encoding and decoding run: the execution device with offload, else the VAE's (ComfyUI moves the
        transformer there only for the sampler)."""
        return self._execution_device or self.c.vae.device

    def _offload_terms(self) -> tuple[memory.Term, ...]:
        """Weights that offload moves onto the device while sampling (they are not there yet)."""
        if self.offload == "model" and self._resident != "transformer":
            leaving = _bytes_of(self.c.text_encoder) if self._resident == "text_encoder" else 0
            moving = max(0, _bytes_of(self.c.transformer) - leaving)
            return (memory.Term("transformer weights", moving, "sampling", "model offload moves them in"),)
        if self.offload == "blocks":
            block = max(_bytes_of(b) for b in self.c.transformer.transformer_blocks)
            return (memory.Term("transformer blocks in flight", 2 * block, "sampling", "block offload"),)
        return ()

    # 2. Sampling ------------------------------------------------------------------------------

    def velocity(self, x: torch.Tensor, timestep: torch.Tensor, cond: SelfConditioning, cfg: float) -> torch.Tensor:
        """Model velocity for the target tokens ``x`` [N, L, 64] at ``timestep`` (σ·1000), with true CFG."""
        n = x.shape[0]
        shapes = [cond.plan.img_shapes] * n

        self._onload("transformer")

        def run(p: PromptEmbeds) -> torch.Tensor:
            emb = p.repeat(n) if p.embeds.shape[0] != n else p
            return predict_velocity(self.c.transformer, x, timestep, cond.ref_tokens, emb.embeds, emb.mask, shapes)

        v = run(cond.positive)
        if cfg > 1:
            if cond.negative is None:
                raise UniRefError("cfg > 1 needs a negative prompt encoding: encode with the same cfg you sample with")
            v = true_cfg(v, run(cond.negative), cfg)
        return v

    def schedule(self, steps: int, output_tokens: int) -> Schedule:
        return flow_schedule(steps, output_tokens, self.c.scheduler_config)

    def sampling_options(
        self, options: SamplingOptions | None = None, /, init_image=None, **overrides
    ) -> SamplingOptions:
        """``options`` with ``overrides`` applied, ``steps`` / ``cfg`` None filled from the model's
        defaults (``uniref.json``, else ours), checked: clear errors before any model work."""
        opts = _sampling_overrides(options, overrides, "sampling_options")
        opts = replace(opts, steps=self.setting("steps", opts.steps), cfg=self.setting("cfg", opts.cfg))
        opts.check(init_image)
        return opts

    @torch.no_grad()
    def denoise(
        self,
        cond: SelfConditioning,
        options: SamplingOptions | None = None,
        *,
        init_image=None,
        is_cancelled: ShouldCancel | None = None,
        **overrides,
    ) -> Iterator[DenoiseStep]:
        """The denoising steps one by one (`sampling.denoise_steps` on this model): ``sample`` takes the
        last one's ``x_next``, RL rollouts keep every step's latents and log-probabilities. ``is_cancelled`` is
        asked before every transformer block (`uniref_core.cancel`); no check stays installed between steps."""
        opts = _sampling_overrides(options, overrides, "denoise")
        opts = self.sampling_options(opts, init_image=init_image)
        if cond.positive.embeds.device != self.device or cond.positive.embeds.dtype != self.dtype:
            cond = cond.to(self.device, self.dtype)
        # Decoding is checked by ``decode``, which callers may run in smaller batches (RL rollouts).
        self.check_memory(cond.plan, **_sampling_memory(cond, opts, ("sampling",)))
        w, h = cond.width, cond.height
        schedule = self.schedule(opts.steps, cond.output_tokens)
        noises, gens = zip(
            *(draw_noise(opts.seed + i, self.latent_channels, w, h, self.vae_scale) for i in range(opts.num_images))
        )
        x = torch.cat(noises).to(self.device, self.dtype)
        if opts.denoise < 1:
            init = load_image(init_image, name="init image")
            with self._vae_pass(w, h), cancel_points(is_cancelled, [self.c.vae], "while encoding the init image"):
                x0 = encode_image(self.c.vae, init, w, h).to(self.device, self.dtype)
            x = noise_latents(x0.expand_as(x), x, schedule.sigmas[opts.start])

        def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.velocity(x, timestep, cond, opts.cfg)

        steps = denoise_steps(
            velocity, x, schedule, start=opts.start, sde=opts.sde_steps, eta=opts.eta, generators=gens
        )
        total = opts.steps - opts.start
        for n in range(total):
            with cancel_points(is_cancelled, [self.c.transformer], f"in step {n + 1} of {total}"):
                step = next(steps)
            yield step

    def sample(
        self,
        cond: SelfConditioning,
        options: SamplingOptions | None = None,
        *,
        init_image=None,
        on_step: Callable[[StepInfo], None] | None = None,
        is_cancelled: ShouldCancel | None = None,
        **overrides,
    ) -> torch.Tensor:
        """Denoise; returns packed target latents [num_images, L, 64]. Image i uses seed ``seed + i``
        and equals a single run with that seed. ``overrides``: fields of `SamplingOptions`."""
        x = None
        for step in self.denoise(cond, options, init_image=init_image, is_cancelled=is_cancelled, **overrides):
            x = step.x_next
            if on_step is not None:
                on_step(StepInfo(step.step, step.total, step.sigma_next, x, step.x0, cond.width, cond.height))
        if not torch.isfinite(x).all():  # would decode to a black image that looks like a result
            raise UniRefError(self._non_finite_message())
        return x

    def _non_finite_message(self) -> str:
        what = "the model produced non-finite values (NaN or inf) while sampling, so there is no image"
        if self.loras:
            names = ", ".join(f"{lw.name} at strength {s:g}" for lw, s in self.loras)
            return (
                f"{what}; LoRA {names} is loaded: lower its strength, or check the file (NaN or huge weights), "
                "or run without it"
            )
        return f"{what}: check the model's weights, or use dtype fp32 (fp16 overflows on Qwen-Image)"

    # 3. Decoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, width: int, height: int, is_cancelled: ShouldCancel | None = None
    ) -> list[Image.Image]:
        """Packed latents → images. Model offload sends the transformer off the device first (where the next edit's
        prompt encode would send it anyway), so the decode's peak is the VAE and its activations. ``is_cancelled`` is
        asked before every VAE stage (per tile when tiled)."""
        output = Plan(mode="budget", budget=None, output=(width, height), token_px=self.token_px)
        self.check_memory(output, self._vae_device, phases=("decoding",), num_images=latents.shape[0])
        self._onload(None)
        with self._vae_pass(width, height), cancel_points(is_cancelled, [self.c.vae], "while decoding the image"):
            pixels = vae_decode(self.c.vae, unpack_latents(latents, width, height, self.vae_scale))
        return to_images(pixels)

    @torch.no_grad()
    def raw_latents(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Packed target tokens → the VAE's own (un-normalised) latents [B, C, h, w], fp32 on the CPU:
        what ComfyUI's LATENT holds for Qwen-Image, so its VAE Decode can take them."""
        lat = unpack_latents(latents.float(), width, height, self.vae_scale)
        mean, std = latent_stats(self.c.vae, lat.device, lat.dtype)
        return (lat * std + mean)[:, :, 0].cpu()

    @torch.no_grad()
    def preview(self, packed: torch.Tensor, width: int, height: int) -> Image.Image:
        """A cheap RGB view of packed latents (first image) through a linear map fitted to this VAE."""
        if self._preview_map is None:
            self._preview_map = self._fit_preview_map()
        lat = unpack_latents(packed[:1].float().cpu(), width, height, self.vae_scale)[0, :, 0]  # [C, h, w]
        c, h, w = lat.shape
        feats = torch.cat([lat.reshape(c, -1).T, torch.ones(h * w, 1)], dim=1)
        rgb = (feats @ self._preview_map).nan_to_num().clamp(0, 1).reshape(h, w, 3)  # NaN: black, no warning
        return Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8))

    def _fit_preview_map(self) -> torch.Tensor:
        # A deterministic mosaic of flat colours: latents there are nearly linear in the colour.
        rng = np.random.default_rng(0)
        cells = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(cells).resize((PREVIEW_FIT_PX, PREVIEW_FIT_PX), Image.Resampling.NEAREST)
        lat = vae_encode(self.c.vae, to_pixels(img, PREVIEW_FIT_PX, PREVIEW_FIT_PX))[0, :, 0].float().cpu()
        c, h, w = lat.shape
        target = torch.from_numpy(np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0)
        feats = torch.cat([lat.reshape(c, -1).T, torch.ones(h * w, 1)], dim=1)
        return torch.linalg.lstsq(feats, target.reshape(-1, 3)).solution

    # All three ---------------------------------------------------------------------------------

    def edit(
        self,
        references,
        prompt: str,
        negative_prompt: str | None = None,
        options: SamplingOptions | None = None,
        *,
        init_image=None,
        on_step=None,
        is_cancelled=None,
        **kwargs,
    ) -> EditResult:
        """Encode, sample, decode. ``kwargs``: fields of `SamplingOptions` (seed, steps, cfg, …) override
        ``options``; the rest go to ``encode`` (mode, budget, width, …)."""
        t0 = time.perf_counter()
        names = SamplingOptions.names()
        overrides = {k: v for k, v in kwargs.items() if k in names}
        encode_options = {k: v for k, v in kwargs.items() if k not in names}
        opts = self.sampling_options(options, init_image=init_image, **overrides)
        cond = self.encode(
            references,
            prompt,
            negative_prompt,
            cfg=opts.cfg,
            is_cancelled=is_cancelled,
            num_images=opts.num_images,
            **encode_options,
        )
        latents = self.sample(cond, opts, init_image=init_image, on_step=on_step, is_cancelled=is_cancelled)
        images = self.decode(latents, cond.width, cond.height, is_cancelled=is_cancelled)
        return EditResult(images, cond.plan, time.perf_counter() - t0, latents)
