"""Will it fit? Peak training memory predicted from the model's configs and a training config, before any weight loads.

    python -m training.memory --config FILE [--processes N] [--gpu-gb G] [--device cuda|cpu]

Every network is built on the meta device from its config (no weights), so its parameters are counted exactly; the
rest is what the trainers hold (`training.sft.trainer`, `training.rl.trainer`), phase by phase:

1. the encoding pass: the text encoder and VAE in the base dtype (bf16 for an fp8 base) and one row's activations;
2. training: the transformer in its dtype (fp32 for a full fine-tune, else the base dtype; fp8: the blocks' linear
   layers in 8 bits), the trainable weights, their gradients and AdamW's two states in fp32 (+ an EMA copy), the VAE
   where it stays (SFT evaluation, RL decoding), and the activations of the config's largest layout.

The peak is the larger phase. Activations follow DESIGN.md §5 (per token and block, in bf16: ~177 KiB without
gradient checkpointing, ~6 KiB with it, at the real width 3072), scaled by the transformer's width; the layout is the
config's largest: its output area, its reference budget fully used, and the text of the template plus the VL tokens.
``device="cpu"`` predicts the growth of a CPU process's resident memory, shared-library code aside (what
``bench/bench_train_memory.py`` measures), which also holds what the encoding pass leaves (``CPU_*`` below);
``device="cuda"`` predicts ``torch.cuda.max_memory_allocated``.

``check_fit(cfg, kind, processes, gpu_bytes)`` raises a ConfigError naming the settings that would fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from uniref_core.budget import DEFAULT_OUTPUT_AREA, plan_references
from uniref_core.prompt import DROP_IDX

from .common.config import CHECKPOINTING_ABOVE, ConfigError, base_dtype

GiB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}

# Activations per token, per channel of the transformer's width (heads × head width), in bf16 (fp32: twice):
# saved by one block for its backward (177 KiB at 3072, DESIGN §5; 59 B measured on the CPU at width 1024) ...
BLOCK_SAVED = 59
# ... saved per block with gradient checkpointing (the block's inputs: ~6 KiB at 3072) ...
CHECKPOINT_SAVED = 2
# ... the recomputed block during its backward: its saved tensors plus the gradients in flight (83 B measured) ...
BACKWARD_BLOCK = 83
# ... and a forward pass without gradients (rollouts): one block's working set (50 B measured).
NO_GRAD_BLOCK = 50
# VAE activations per pixel and per channel of its base width, in fp32 (an untiled decode: 7.4 GiB per megapixel
# at the real base width 96; the encoder is taken as the same).
VAE_PER_PIXEL = 81
# Text tokens beside the VL tokens: the template's end, "Picture k: <|vision_start|>…<|vision_end|>" per reference,
# and an instruction of up to this many tokens (ShapeCompose's are ~35).
TEMPLATE_END_TOKENS = 5
PICTURE_LABEL_TOKENS = 6
INSTRUCTION_TOKENS = 64
# References assumed when the manifest cannot be read (ComfyUI's Qwen node stops at 3).
DEFAULT_REFERENCES = 3
# CPU only: what the encoding pass leaves resident through training after the encoders are freed (heap, processor):
# about constant, 14 and 18 MiB measured on models of 30 M and 190 M transformer parameters. Shared-library code
# is not counted (nor measured by the bench): which kernels a CPU takes sets it, 57 MiB on one machine type and
# ~175 on another.
CPU_ENCODER_RESIDUE = 16 * 2**20


# --------------------------------------------------------------------------------------------------
# The networks, counted from their configs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Networks:
    """Parameter counts of a model folder's three networks, and the shapes the activations scale with."""

    transformer: int
    block_linears: int  # weights of transformer_blocks' linear layers: what base_dtype fp8 stores in 8 bits
    blocks: int
    width: int  # heads × head width: the channels of every token in a block
    text_encoder: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    vocab: int
    vision_hidden: int
    vae: int
    vae_base_dim: int
    token_px: int
    transformer_file_bytes: int  # its safetensors files on disk (config-only folders: bf16 assumed)
    text_encoder_file_bytes: int
    linears: tuple = ()  # (name, in, out) of every linear layer of the transformer, for LoRA counts

    def lora_parameters(self, rank: int, targets) -> int:
        """LoRA weights on the linear layers ``targets`` names, matched as peft matches them."""
        return sum(
            rank * (i + o) for name, i, o in self.linears if any(name == t or name.endswith("." + t) for t in targets)
        )


def _meta(build):
    import torch

    with torch.device("meta"):
        return build()


def _files_bytes(folder: Path, fallback: int) -> int:
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else fallback


@functools.lru_cache(maxsize=8)
def _networks(model: str, _stamp: str) -> Networks:
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from uniref_core.model import token_px_of

    root = Path(model)
    tcfg = {k: v for k, v in _read(root / "transformer" / "config.json").items() if not k.startswith("_")}
    t = _meta(lambda: QwenImageTransformer2DModel(**tcfg))
    linears = tuple((n, m.in_features, m.out_features) for n, m in t.named_modules() if isinstance(m, torch.nn.Linear))
    t_params = _count(t)
    block_linears = sum(i * o for n, i, o in linears if n.startswith("transformer_blocks."))
    del t
    config = Qwen2_5_VLConfig.from_pretrained(root / "text_encoder", local_files_only=True)  # nosec B615  # a local folder, local_files_only=True: nothing is fetched from the Hub
    te_params = _count(_meta(lambda: Qwen2_5_VLForConditionalGeneration(config)))
    text, vision = config.text_config, config.vision_config
    vcfg = {k: v for k, v in _read(root / "vae" / "config.json").items() if not k.startswith("_")}
    vae_params = _count(_meta(lambda: AutoencoderKLQwenImage(**vcfg)))
    return Networks(
        transformer=t_params,
        block_linears=block_linears,
        blocks=tcfg.get("num_layers", 60),
        width=tcfg.get("num_attention_heads", 24) * tcfg.get("attention_head_dim", 128),
        text_encoder=te_params,
        text_hidden=text.hidden_size,
        text_intermediate=text.intermediate_size,
        text_layers=text.num_hidden_layers,
        vocab=text.vocab_size,
        vision_hidden=vision.hidden_size,
        vae=vae_params,
        vae_base_dim=vcfg.get("base_dim", 96),
        token_px=token_px_of(root),
        transformer_file_bytes=_files_bytes(root / "transformer", 2 * t_params),
        text_encoder_file_bytes=_files_bytes(root / "text_encoder", 2 * te_params),
        linears=linears,
    )


def networks(model) -> Networks:
    """The counts of ``model``'s networks (cached per folder and config contents)."""
    root = Path(model).expanduser()
    try:
        stamp = "".join((root / part / "config.json").read_text() for part in ("transformer", "text_encoder", "vae"))
    except OSError as e:
        raise ConfigError(
            f"model {root}: its configs could not be read ({e}); give a diffusers-format folder with "
            "transformer/, text_encoder/ and vae/ config.json"
        ) from None
    return _networks(str(root), stamp)


def _count(module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------
# The run, as the planner sees it
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The largest sample a config trains on, in tokens."""

    output: int
    references: int
    text: int
    vl: int
    k: int
    output_area: int
    budget: int

    @property
    def tokens(self) -> int:
        return self.output + self.references + self.text

    def describe(self) -> str:
        return (
            f"{_area(self.output_area)} output ({self.output}) + {_area(self.budget)} reference budget, {self.k} "
            f"references ({self.references}) + text ({self.text}, {self.vl} of them VL) = {self.tokens} tokens"
        )


@dataclass(frozen=True)
class Setup:
    """The settings memory depends on: what ``suggest`` changes to make a run fit."""

    kind: str  # "sft" | "msgrpo"
    base: str  # fp32 | bf16 | fp8, "auto" resolved
    mixed: bool  # autocast bf16
    lora_rank: int | None
    lora_targets: tuple
    checkpointing: bool
    ema: bool
    micro: int  # samples in one forward with gradients (SFT micro_batch_size; RL policy_micro_batch or G)
    group: int  # RL: G, the rollout batch; SFT: 0
    cfg_pass: int  # 2 when RL's true CFG runs a negative pass beside each positive one
    decode_batch: int
    keeps_vae: bool  # the VAE stays in phase 2 (SFT evaluation, RL decoding)
    encodes: bool  # the encoding pass runs in this process (a first run; later runs reuse the cache)
    optimizer_in_backward: bool  # AdamW's states already exist at a backward pass (from the second step on)
    processes: int
    fsdp: bool


@dataclass
class Part:
    name: str
    dtype: str
    device: str
    bytes: int
    phase: str  # "encoding" | "training"
    note: str = ""


@dataclass
class Estimate:
    setup: Setup
    layout: Layout
    device: str
    parts: list[Part] = field(default_factory=list)

    def phase_total(self, phase: str) -> int:
        return sum(p.bytes for p in self.parts if p.phase in (phase, "both"))

    @property
    def peak(self) -> int:
        return max(self.phase_total("encoding"), self.phase_total("training"))


def _setup(cfg, kind: str, processes: int, fsdp: bool | None) -> Setup:
    from .common.model import transformer_parameters

    lora = cfg.lora
    ckpt = cfg.gradient_checkpointing
    if ckpt is None:
        ckpt = transformer_parameters(cfg.model) > CHECKPOINTING_ABOVE
    full = lora is None
    if kind == "sft":
        micro = max(s.micro_batch_size or cfg.micro_batch_size for s in cfg.stages)
        group, cfg_pass, decode, keeps_vae = 0, 1, 0, bool(cfg.eval_samples and cfg.val_manifest)
        steps = cfg.total_steps
    else:
        cfg_pass = 2 if cfg.cfg > 1 else 1
        micro, group, decode, keeps_vae = (
            cfg.policy_micro_batch or cfg.group_size,
            cfg.group_size,
            cfg.decode_batch,
            True,
        )
        steps = cfg.steps
    return Setup(
        kind=kind,
        base=base_dtype(cfg),
        mixed=cfg.mixed_precision == "bf16",
        lora_rank=None if full else lora.rank,
        lora_targets=() if full else tuple(lora.targets),
        checkpointing=bool(ckpt),
        ema=bool(getattr(cfg, "ema_decay", None)),
        micro=micro,
        group=group,
        cfg_pass=cfg_pass,
        decode_batch=decode,
        keeps_vae=keeps_vae,
        encodes=True,
        optimizer_in_backward=steps > 1,
        processes=processes,
        fsdp=bool(getattr(cfg, "fsdp", False)) if fsdp is None else fsdp,
    )


def _references(manifests) -> int:
    """The most references a manifest row has (the layout's K); DEFAULT_REFERENCES when none can be read."""
    k = 0
    for path in manifests:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        k = max(k, len(row.get("references", [])))
        except (OSError, ValueError, AttributeError):
            continue
    return k or DEFAULT_REFERENCES


def layout(cfg, kind: str, token_px: int) -> Layout:
    """The config's largest sample: its output area, its reference budget fully used (K square references), text."""
    k = _references(cfg.train_manifest)
    if kind == "sft":
        pairs = [(s.output_size or DEFAULT_OUTPUT_AREA, s.budget) for s in cfg.stages]
    else:
        from uniref_core.pipeline import BUILTIN_DEFAULTS

        pairs = [(cfg.output_size or DEFAULT_OUTPUT_AREA, cfg.budget or BUILTIN_DEFAULTS["budget"])]
    best = None
    for out_area, budget in pairs:
        side = max(token_px, round(math.sqrt(out_area) / token_px) * token_px)
        plan = plan_references(
            [(1024, 1024)] * k, "budget", budget, vl_budget=cfg.vl_budget, width=side, height=side, token_px=token_px
        )
        text = TEMPLATE_END_TOKENS + k * PICTURE_LABEL_TOKENS + INSTRUCTION_TOKENS + plan.vl_tokens
        lay = Layout(plan.output_tokens, plan.reference_tokens, text, plan.vl_tokens, k, out_area, budget)
        best = lay if best is None or lay.tokens > best.tokens else best
    return best


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


def estimate(net: Networks, s: Setup, lay: Layout, device: str = "cuda") -> Estimate:
    """Every part resident at the peak of each phase, per process."""
    cpu = device == "cpu"
    where = "RAM" if cpu else "GPU"
    e = Estimate(s, lay, device)
    add = e.parts.append
    enc = "bf16" if s.base == "fp8" else s.base
    act = 2 if s.mixed else 4  # bytes per activation value

    # 1. The encoding pass.
    if s.encodes:
        add(
            Part("text encoder", enc, where, net.text_encoder * BYTES[enc], "encoding", "freed before the transformer")
        )
        te_seq = lay.text + DROP_IDX
        te_act = (
            te_seq * BYTES[enc] * (net.text_hidden * (net.text_layers + 1) + net.vocab + 3 * net.text_intermediate)
        )
        te_act += 4 * lay.vl * net.vision_hidden * BYTES[enc] * 10  # the vision tower: 4 patches per VL token
        add(Part("text encoder activations", enc, where, te_act, "encoding"))
        add(Part("VAE encode activations", enc, where, _vae_activations(net, lay, 1, enc), "encoding", "one image"))
        if cpu:
            add(Part("encoding pass residue", "-", where, CPU_ENCODER_RESIDUE, "training", "what it leaves resident"))
    add(
        Part(
            "VAE",
            enc,
            where,
            net.vae * BYTES[enc],
            "both" if s.keeps_vae else "encoding",
            "stays to decode" if s.keeps_vae else "",
        )
    )

    # 2. The transformer and what trains.
    full = s.lora_rank is None
    shard = s.processes if s.fsdp else 1
    per_block = net.transformer / net.blocks
    if full:
        add(
            Part(
                "transformer",
                "fp32",
                where,
                4 * net.transformer // shard,
                "training",
                f"1/{shard} per process (FSDP)" if shard > 1 else "every weight trains",
            )
        )
        trainable = net.transformer
        if s.fsdp:  # one block gathered whole in fp32, its bf16 cast and its gradient before the reduce-scatter
            add(Part("FSDP gathered block", "fp32", where, int(per_block * (4 + 2 * s.mixed + 4)), "training"))
    else:
        if s.base == "fp8":
            rest = net.transformer - net.block_linears
            add(Part("transformer", "fp8", where, net.block_linears + 2 * rest, "training", "block linears 8-bit"))
            # Each layer is up-cast as it runs; the recomputed block's bf16 weights are saved for its backward.
            add(Part("fp8 layers up-cast", "bf16", where, int(2 * net.block_linears / net.blocks), "training"))
        else:
            add(Part("transformer", s.base, where, BYTES[s.base] * net.transformer, "training", "frozen"))
        trainable = net.lora_parameters(s.lora_rank, s.lora_targets)
    t_shard = trainable // shard
    label = "weights" if full else f"LoRA r{s.lora_rank}"
    if not full:
        add(Part(f"{label} weights", "fp32", where, 4 * t_shard, "training"))
    add(Part(f"{label} gradients", "fp32", where, 4 * t_shard, "training"))
    if s.optimizer_in_backward:
        add(Part("AdamW states", "fp32", where, 8 * t_shard, "training", "2 per weight"))
    if s.ema:
        add(Part("EMA", "fp32", where, 4 * t_shard, "training"))
    if s.mixed and not full:  # autocast keeps a bf16 cast of every fp32 weight it used until the forward ends
        add(Part("autocast casts", "bf16", where, 2 * t_shard, "training"))

    # 3. Activations of the largest layout.
    add(
        Part(
            "activations",
            "bf16" if s.mixed else "fp32",
            where,
            _train_activations(net, s, lay, act),
            "training",
            _activation_note(s, lay),
        )
    )
    return e


def _train_activations(net: Networks, s: Setup, lay: Layout, act: int) -> int:
    """The larger of the backward with gradients and (RL) the rollouts and their decoding."""
    scale = act / 2 * net.width
    tokens = s.micro * s.cfg_pass * lay.tokens
    if s.checkpointing:
        grad = tokens * scale * (net.blocks * CHECKPOINT_SAVED + BACKWARD_BLOCK)
    else:
        grad = tokens * scale * net.blocks * BLOCK_SAVED
    if s.kind != "msgrpo":
        return int(grad)
    rollout = s.group * s.cfg_pass * lay.tokens * scale * NO_GRAD_BLOCK
    decode = _vae_activations(net, lay, s.decode_batch, "bf16" if s.mixed else "fp32")
    return int(max(grad, rollout, decode))


def _activation_note(s: Setup, lay: Layout) -> str:
    n = s.micro * s.cfg_pass
    what = "checkpointed" if s.checkpointing else "every block saved"
    return f"{n} × {lay.tokens} tokens with gradients, {what}" + (
        f"; rollouts of {s.group * s.cfg_pass}" if s.group else ""
    )


def _vae_activations(net: Networks, lay: Layout, images: int, dtype: str) -> int:
    pixels = max(lay.output_area, lay.budget)
    return int(images * pixels * net.vae_base_dim * VAE_PER_PIXEL * BYTES[dtype] / 4)


# --------------------------------------------------------------------------------------------------
# The public API
# --------------------------------------------------------------------------------------------------


def load_any_config(path):
    """(config, kind) of an SFT or MSGRPO config file, told apart by their keys (SFT has stages)."""
    from .common.config import read_config_data

    data = read_config_data(path)
    if isinstance(data, dict) and "stages" in data:
        from .sft.config import config_from_dict

        return config_from_dict(data), "sft"
    from .rl.config import config_from_dict

    return config_from_dict(data), "msgrpo"


def plan(cfg, kind: str, processes: int = 1, device: str = "cuda", fsdp: bool | None = None, **changes) -> Estimate:
    """The estimate of ``cfg`` (a loaded SFT or RL config) over ``processes``; ``changes``: Setup fields overridden."""
    net = networks(cfg.model)
    setup = dataclasses.replace(_setup(cfg, kind, processes, fsdp), **changes)
    return estimate(net, setup, layout(cfg, kind, net.token_px), device)


def predict_peak(config_path, kind: str = "sft", processes: int = 1, device: str = "cpu") -> int:
    """Predicted peak bytes per process of training ``config_path`` (what bench/bench_train_memory.py compares)."""
    from .common.config import read_config_data

    if kind == "sft":
        from .sft.config import config_from_dict
    else:
        from .rl.config import config_from_dict
    return plan(config_from_dict(read_config_data(config_path)), kind, processes, device).peak


def suggest(cfg, kind: str, processes: int, gpu_bytes: int, device: str = "cuda") -> list[tuple[str, int]]:
    """Settings that would fit ``gpu_bytes``: (what to set, predicted peak) for each single change that fits, else
    one combination of changes, applied in order until it fits; [] when nothing the trainers offer does."""
    base = plan(cfg, kind, processes, device)
    s = base.setup
    steps: list[tuple[str, dict]] = []
    if not s.checkpointing:
        steps.append(("gradient_checkpointing true", {"checkpointing": True}))
    if s.lora_rank is not None and s.base == "fp32":
        steps.append(('base_dtype "bf16" (with mixed_precision "bf16")', {"base": "bf16", "mixed": True}))
    if s.lora_rank is not None and s.base != "fp8":
        steps.append(('base_dtype "fp8" (with mixed_precision "bf16")', {"base": "fp8", "mixed": True}))
    if s.micro > 1:
        key = "micro_batch_size" if kind == "sft" else "policy_micro_batch"
        for m in _halvings(s.micro):
            steps.append((f"{key} {m}", {"micro": m}))
    if s.lora_rank is not None:
        for r in (r for r in (32, 16, 8) if r < s.lora_rank):
            steps.append((f"lora rank {r}", {"lora_rank": r}))
    if s.ema:
        steps.append(("ema_decay null", {"ema": False}))
    if s.lora_rank is None and s.processes < 8:
        for n in (n for n in (2, 4, 8) if n > s.processes):
            steps.append(
                (f'"fsdp": true over {n} processes (torchrun --nproc_per_node {n})', {"processes": n, "fsdp": True})
            )

    def peak(changes: dict) -> int:
        return estimate(networks(cfg.model), dataclasses.replace(s, **changes), base.layout, device).peak

    singles = [(label, peak(ch)) for label, ch in steps]
    fitting = [(label, p) for label, p in singles if p <= gpu_bytes]
    if fitting:
        return _first_per_key(fitting)
    applied, changes, out = [], {}, []
    for label, ch in steps:  # cumulative: the cheapest settings first, each kept
        changes.update(ch)
        applied.append(label)
        p = peak(changes)
        if p <= gpu_bytes:
            return [(" + ".join(_dedupe(applied)), p)]
    return out


def _halvings(n: int) -> list[int]:
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


def _first_per_key(items: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """For settings with several values (rank 32, 16, 8…) only the mildest that fits."""
    seen, out = set(), []
    for label, p in items:
        key = label.split(" ")[0] if not label[0].isdigit() else "processes"
        if key not in seen:
            seen.add(key)
            out.append((label, p))
    return out


def _dedupe(labels: list[str]) -> list[str]:
    """In a combination, a later value of the same setting replaces the earlier one."""
    out: dict[str, str] = {}
    for label in labels:
        out[label.split(" ")[0] if not label[0].isdigit() else "processes"] = label
    return list(out.values())


#: Environment variable that lets a run start although the planner says it will not fit (its estimate may be off).
NO_FIT_CHECK = "UNIREF_NO_FIT_CHECK"


def check_fit(cfg, kind: str, processes: int, gpu_bytes: int) -> None:
    """Raise a ConfigError, before any weight loads, when ``cfg`` cannot fit ``gpu_bytes`` per GPU; it names the
    settings that would."""
    est = plan(cfg, kind, processes, "cuda")
    if est.peak <= gpu_bytes or os.environ.get(NO_FIT_CHECK):
        return
    fixes = suggest(cfg, kind, processes, gpu_bytes)
    how = (
        "; ".join(f"{label} (→ {_gib(p)})" for label, p in fixes)
        if fixes
        else "no setting of these trainers does: use a larger GPU, or a trainer with offloading (block swap)"
    )
    raise ConfigError(
        f"this run needs ~{_gib(est.peak)} per GPU and the GPU has {_gib(gpu_bytes)} "
        f"(training/memory.py); to fit, set {how}. The estimate is within ~15 %: to try anyway, set "
        f"{NO_FIT_CHECK}=1"
    )


# --------------------------------------------------------------------------------------------------
# Config-only model folders (real size, for planning without downloading weights)
# --------------------------------------------------------------------------------------------------

#: Qwen-Image-Edit's transformer (DESIGN.md §2).
REAL_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=[16, 56, 56],
)
#: Qwen2.5-VL-7B-Instruct, the text encoder.
REAL_TEXT_ENCODER = dict(
    model_type="qwen2_5_vl",
    architectures=["Qwen2_5_VLForConditionalGeneration"],
    tie_word_embeddings=False,
    text_config=dict(
        model_type="qwen2_5_vl_text",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    ),
    vision_config=dict(
        model_type="qwen2_5_vl_vision",
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
)
#: Qwen-Image's VAE.
REAL_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[0.0] * 16,
    latents_std=[1.0] * 16,
)


def write_config_only_model(
    folder, transformer: dict | None = None, text_encoder: dict | None = None, vae: dict | None = None
) -> Path:
    """A model folder with the three networks' configs and no weights (real size unless given): enough to plan."""
    folder = Path(folder)
    parts = {
        "transformer": ("QwenImageTransformer2DModel", transformer or REAL_TRANSFORMER),
        "text_encoder": (None, text_encoder or REAL_TEXT_ENCODER),
        "vae": ("AutoencoderKLQwenImage", vae or REAL_VAE),
    }
    for name, (cls, config) in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        data = {"_class_name": cls, **config} if cls else dict(config)
        (folder / name / "config.json").write_text(json.dumps(data, indent=1))
    return folder


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _area(area: int) -> str:
    side = math.isqrt(area)
    return f"{side}²" if side * side == area else f"{area} px"


def describe_setup(s: Setup) -> str:
    what = "full fine-tune" if s.lora_rank is None else f"LoRA r{s.lora_rank}"
    parts = [
        s.kind.upper() if s.kind == "sft" else "MSGRPO",
        what,
        f"base {s.base}",
        f"checkpointing {'on' if s.checkpointing else 'off'}",
        f"{s.processes} process(es)" + (" FSDP" if s.fsdp else ""),
    ]
    if s.group:
        parts.append(f"G {s.group}, re-scored {s.micro} at a time")
    return ", ".join(parts)


def report(cfg, kind: str, processes: int, gpu_bytes: int, device: str = "cuda") -> tuple[str, bool]:
    """The planner's printout and whether the run fits."""
    est = plan(cfg, kind, processes, device)
    lines = [
        describe_setup(est.setup),
        f"largest sample: {est.layout.describe()}",
        "",
        f"{'part':<28} {'dtype':<6} {'device':<6} {'GiB':>7}  phase",
    ]
    for p in est.parts:
        if p.bytes:
            note = f" ({p.note})" if p.note else ""
            lines.append(f"{p.name:<28} {p.dtype:<6} {p.device:<6} {p.bytes / GiB:>7.2f}  {p.phase}{note}")
    enc, train = est.phase_total("encoding"), est.phase_total("training")
    lines += [
        "",
        f"encoding pass: {_gib(enc)}; training: {_gib(train)}",
        f"total per {'GPU' if device == 'cuda' else 'process'}: {_gib(est.peak)} of {_gib(gpu_bytes)}",
    ]
    fits = est.peak <= gpu_bytes
    if fits:
        lines.append("fits")
    else:
        fixes = suggest(cfg, kind, processes, gpu_bytes, device)
        lines.append("does not fit; any one of these would:" if len(fixes) > 1 else "does not fit; this would:")
        lines += [f"  {label}: {_gib(p)}" for label, p in fixes] or [
            "  nothing the trainers offer: use a larger GPU, or a trainer with offloading (block swap)"
        ]
    return "\n".join(lines), fits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.memory", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="an SFT or MSGRPO config (JSON or TOML)")
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help='GPUs (processes); with "fsdp": true a full fine-tune is sharded over them',
    )
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB (an 80 GB card: 80)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a CPU process's resident memory")
    args = ap.parse_args(argv)
    try:
        cfg, kind = load_any_config(args.config)
        text, _ = report(cfg, kind, args.processes, int(args.gpu_gb * GiB), args.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
