"""SFT configuration: one dataclass, loaded from JSON or TOML, checked before any model work.

A config names the model to start from, the manifests, and a list of stages (progressive budgets).
Every field has a default that works except ``model``, ``train_manifest`` and ``stages``. Unknown keys
and impossible values fail with a message naming the key (and the stage).

Example (JSON)::

    {
      "model": "models/tiny",
      "train_manifest": "data/shapecompose/train/manifest.jsonl",
      "val_manifest": "data/shapecompose/val/manifest.jsonl",
      "output_dir": "runs/tiny_sft",
      "stages": [
        {"budget": 128, "steps": 200, "lr": 1e-4, "batch_size": 8, "output_size": 64},
        {"budget": 192, "steps": 200, "lr": 5e-5, "batch_size": 8, "output_size": 64}
      ],
      "micro_batch_size": 1,
      "lora": {"rank": 16, "alpha": 16}
    }

Sizes (``budget``, ``output_size``, ``vl_budget``) are areas: 256 means 256², "1536x1024" a
rectangle's area, a number ≥ 65536 a pixel count (`uniref_core.budget.parse_area`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..common.config import (
    MIXED_PRECISION,
    ConfigError,
    HashedConfig,
    LoraSettings,
    Stage,
    _area,
    _check_keys,
    _lora,
    _paths,
    _positive,
    check_output_dir,
    check_precision,
    check_seed,
    check_types,
    model_arg,
    read_config_data,
)
from ..common.schedules import SCHEDULES

# Keys that change how a run is watched or stored, not the weights it produces: a resume may change them.
# The model is checked by its fingerprint instead of its path, so a moved model folder still resumes.
NOT_HASHED = (
    "model",
    "output_dir",
    "cache_dir",
    "gradient_checkpointing",
    "save_every",
    "keep_checkpoints",
    "eval_every",
    "eval_samples",
    "eval_steps",
    "eval_cfg",
    "log_every",
    "tensorboard",
    "val_manifest",
    "fsdp",
)


@dataclass
class LogitNormal:
    """σ = sigmoid(N(mean, std)): the SD3 / Qwen-Image training-time distribution.

    ``pure_noise``: the share of draws put at σ = 1 exactly, where the sampler takes its first step and
    only the references and the instruction can say what the image is. A logit-normal almost never
    draws σ that high (mean 1, std 1: 0.7 % above 0.97), and a small model then learns to read the
    layout from the faint image left in x_σ instead of from the conditioning: its first step from pure
    noise is wrong and sampling gives blobs.
    """

    mean: float = 0.0
    std: float = 1.0
    pure_noise: float = 0.0


@dataclass
class SFTConfig(HashedConfig):
    model: str  # diffusers-format model folder to start from
    train_manifest: list[str]  # one or more ShapeCompose-style JSONL manifests
    stages: list[Stage]
    val_manifest: list[str] = field(default_factory=list)
    output_dir: str = "runs/sft"
    seed: int = 0
    lora: LoraSettings | None = None  # None: full fine-tune of the transformer
    gradient_checkpointing: bool | None = None  # None: on above 1 B transformer parameters
    mixed_precision: str = "no"  # "no" | "bf16"
    base_dtype: str = "auto"  # frozen weights: "auto" (bf16 under mixed_precision bf16, else fp32) | fp32 | bf16 | fp8
    ema_decay: float | None = None  # None: no EMA
    # Full fine-tune sharded over the processes with FSDP2 (weights, gradients and AdamW state 1/N each, checkpoints
    # sharded and resumable at any process count). Not hashed: the checkpoint's own format is checked on resume.
    fsdp: bool = False
    # Every row is encoded once before training (prompt embeddings, and reference/target latents per stage) into
    # safetensors shards here, reused by resume and by later runs on the same model, data and sizes; None:
    # <output_dir>/cache. The text encoder and VAE are then freed before the transformer loads.
    cache_dir: str | None = None
    vl_budget: int | None = (
        None  # area of ALL VL copies together; None: the model's default (uniref.json), else 384² each, like inference
    )
    upscale: bool = True  # references smaller than their budget share are upscaled (inference default)
    allow_target_upscale: bool = False  # a target smaller than a stage's output size is a bad row unless set
    logit_normal: LogitNormal = field(default_factory=LogitNormal)
    warmup: int = 0  # linear warmup steps at the start of every stage
    schedule: str = "constant"  # "constant" | "cosine" (to 0 at the stage's end), after warmup
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # Samples per forward pass, all of ONE layout (see common.data.layout_key). A global batch is
    # batch_size / micro_batch_size micro-batches, each drawn from its own layout bucket; a process
    # accumulates gradients over its share of them. 1 lets every sample keep its own layout.
    micro_batch_size: int = 1
    eval_every: int = 0  # 0: evaluate only at stage ends
    eval_samples: int = 4
    eval_steps: int = 8
    eval_cfg: float = 1.0
    save_every: int = 0  # 0: checkpoint only at stage ends
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = True

    not_hashed = NOT_HASHED

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


# --------------------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------------------


def _stage(data, i: int) -> Stage:
    where = f"stages[{i}] (stage {i + 1})"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object with budget, steps, lr and batch_size")
    _check_keys(data, Stage, where)
    for key in ("budget", "steps", "lr", "batch_size"):
        if key not in data:
            raise ConfigError(f"{where} has no {key!r}: every stage needs budget, steps, lr and batch_size")
    stage = Stage(
        budget=_area(data["budget"], where, "budget"),
        steps=data["steps"],
        lr=data["lr"],
        batch_size=data["batch_size"],
        output_size=_area(data.get("output_size"), where, "output_size", allow_none=True),
        warmup=data.get("warmup"),
        schedule=data.get("schedule"),
        micro_batch_size=data.get("micro_batch_size"),
    )
    _positive(stage.steps, where, "steps")
    _positive(stage.batch_size, where, "batch_size")
    if not isinstance(stage.lr, (int, float)) or not stage.lr > 0:
        raise ConfigError(f"{where}: lr is {stage.lr!r}: give a positive learning rate such as 1e-4")
    if stage.warmup is not None:
        _positive(stage.warmup, where, "warmup", minimum=0)
    if stage.micro_batch_size is not None:
        _positive(stage.micro_batch_size, where, "micro_batch_size")
    if stage.schedule is not None and stage.schedule not in SCHEDULES:
        raise ConfigError(f"{where}: schedule is {stage.schedule!r}: use one of {', '.join(SCHEDULES)}")
    return stage


def config_from_dict(data: dict) -> SFTConfig:
    """Build and check a config from plain data (what JSON/TOML give)."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be an object (JSON) or a table (TOML) of keys")
    _check_keys(data, SFTConfig, "the config")
    for key in ("model", "train_manifest", "stages"):
        if key not in data:
            raise ConfigError(f"the config has no {key!r}: it is required")
    stages = data["stages"]
    if not isinstance(stages, list) or not stages:
        raise ConfigError(
            'stages is empty: give at least one stage such as {"budget": 1024, "steps": 1000, '
            '"lr": 1e-4, "batch_size": 8}'
        )
    kwargs = dict(data)
    kwargs["stages"] = [_stage(s, i) for i, s in enumerate(stages)]
    kwargs["train_manifest"] = _paths(data["train_manifest"], "train_manifest")
    kwargs["model"] = model_arg(data["model"])  # a folder, or a built-in name
    kwargs["val_manifest"] = _paths(data.get("val_manifest"), "val_manifest")
    if not kwargs["train_manifest"]:
        raise ConfigError("train_manifest is empty: give the JSONL manifest(s) to train on")
    kwargs["lora"] = _lora(data.get("lora"))
    if kwargs["lora"] is not None and not kwargs["lora"].targets:
        raise ConfigError("lora.targets is empty: name the linear layers to adapt, e.g. to_q, to_k, to_v")
    ln = data.get("logit_normal", {})
    if not isinstance(ln, dict):
        raise ConfigError("logit_normal must be an object {mean, std}")
    _check_keys(ln, LogitNormal, "logit_normal")
    kwargs["logit_normal"] = LogitNormal(**ln)
    if isinstance(data.get("betas"), list):  # JSON and TOML have no tuples; anything else fails check_types
        kwargs["betas"] = tuple(data["betas"])
    kwargs["vl_budget"] = _area(data.get("vl_budget"), "the config", "vl_budget", allow_none=True)
    cfg = SFTConfig(**kwargs)
    check_types(cfg)
    _check_top(cfg)
    return cfg


def _check_top(cfg: SFTConfig) -> None:
    where = "the config"
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision is {cfg.mixed_precision!r}: use one of {', '.join(MIXED_PRECISION)}")
    check_precision(cfg)
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"schedule is {cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    if cfg.fsdp not in (True, False):
        raise ConfigError(f"fsdp is {cfg.fsdp!r}: true (a full fine-tune sharded over the processes) or false")
    if cfg.fsdp and cfg.lora is not None:
        raise ConfigError(
            "fsdp is for a full fine-tune (it shards every weight, gradient and AdamW state); a LoRA "
            "run trains few weights and runs under plain data parallel: set lora null, or fsdp false"
        )
    if cfg.fsdp and cfg.ema_decay is not None:
        raise ConfigError(
            "ema_decay is set with fsdp: the EMA would be a second unsharded copy of every weight; set "
            "ema_decay null with fsdp, or fsdp false"
        )
    if cfg.ema_decay is not None and not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"ema_decay is {cfg.ema_decay!r}: use a value in (0, 1) such as 0.999, or null for no EMA")
    if cfg.logit_normal.std <= 0:
        raise ConfigError(f"logit_normal.std is {cfg.logit_normal.std!r}: it must be positive")
    if not 0.0 <= cfg.logit_normal.pure_noise < 1.0:
        raise ConfigError(
            f"logit_normal.pure_noise is {cfg.logit_normal.pure_noise!r}: give a share in [0, 1), e.g. 0.25"
        )
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ConfigError(f"max_grad_norm is {cfg.max_grad_norm!r}: give a positive norm or null for no clipping")
    for key in ("micro_batch_size", "eval_steps", "keep_checkpoints", "log_every"):
        _positive(getattr(cfg, key), where, key)
    for key in ("eval_every", "save_every", "eval_samples", "warmup"):
        _positive(getattr(cfg, key), where, key, minimum=0)
    check_seed(cfg.seed, where)
    check_output_dir(cfg.output_dir)
    for i, stage in enumerate(cfg.stages):
        micro = micro_batch_size(stage, cfg)
        if stage.batch_size % micro:
            raise ConfigError(
                f"stages[{i}] (stage {i + 1}): batch_size {stage.batch_size} is not a multiple of micro_batch_size "
                f"{micro}: make it one"
            )


def micro_batch_size(stage: Stage, cfg: SFTConfig) -> int:
    return cfg.micro_batch_size if stage.micro_batch_size is None else stage.micro_batch_size


def check_world(cfg: SFTConfig, num_processes: int) -> None:
    """Every global batch must split into the same number of micro-batches on every process."""
    for i, stage in enumerate(cfg.stages):
        micro = micro_batch_size(stage, cfg)
        if stage.batch_size % (micro * num_processes):
            raise ConfigError(
                f"stages[{i}] (stage {i + 1}): batch_size {stage.batch_size} does not split into micro-batches of "
                f"{micro} over {num_processes} process(es): use a multiple of {micro * num_processes}"
            )


def load_config(path) -> SFTConfig:
    """Read a ``.json`` or ``.toml`` SFT config file."""
    return config_from_dict(read_config_data(path))
