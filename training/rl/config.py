"""MSGRPO configuration: one dataclass, loaded from JSON or TOML, checked before any model work.

Example (JSON)::

    {
      "model": "models/uniref-default",
      "train_manifest": "runs/uniref-default/data-anchored/train/manifest.jsonl",
      "output_dir": "runs/msgrpo",
      "steps": 100, "lr": 1e-5, "group_size": 8, "groups_per_step": 2,
      "rollout_steps": 10, "sde_window": [0, 4],
      "rewards": [{"source": "checker", "weight": 1.0}],
      "aggregation": "min"
    }

Every key but ``model`` and ``train_manifest`` has a default. Unknown keys and impossible values fail with
a message naming the key.
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
from .advantages import AGGREGATIONS

# Keys that change how a run is watched or stored, not the weights it produces: a resume may change them.
NOT_HASHED = (
    "model",
    "output_dir",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "grid_every",
    "tensorboard",
    "decode_batch",
    "policy_micro_batch",
    "gradient_checkpointing",
    "cache_dir",
)


@dataclass
class RewardSpec:
    source: str  # a built-in name ("checker", "features", "judge") or "package.module:factory"
    weight: float = 1.0  # applied to every signal of the source
    options: dict = field(default_factory=dict)  # passed to the factory
    signal_weights: dict = field(default_factory=dict)  # per signal of the source, e.g. {"instruction": 2.0}


@dataclass
class RLConfig(HashedConfig):
    model: str  # diffusers-format model folder to start from (the SFT model)
    train_manifest: list[str]  # prompts: rows of ShapeCompose-style manifests (references + instruction + spec)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("checker")])
    aggregation: str = "normalized_sum"  # see training.rl.advantages
    output_dir: str = "runs/msgrpo"
    seed: int = 0
    steps: int = 100  # optimizer steps; each one rolls out groups_per_step groups of group_size images
    lr: float = 1e-5
    warmup: int = 0
    group_size: int = 8  # G: images per prompt (same references, different noise)
    groups_per_step: int = 2  # prompts per step, split over processes (whole groups per process)
    rollout_steps: int = 10  # denoising steps of a rollout
    eta: float = 0.7  # SDE noise level
    sde_window: list[int] | None = None  # [first, stop) of the rollout steps that take the SDE step; None: all
    cfg: float = 1.0
    budget: int | None = None  # SELF reference budget (area); None: the model's default (uniref.json)
    output_size: int | None = None  # target area; None: each target's own size
    vl_budget: int | None = None
    upscale: bool = True
    allow_target_upscale: bool = False
    clip_range: float = 1e-4  # ε of the clipped ratio (log-probs are means over elements: ratios stay near 1)
    adv_clip_max: float = 5.0
    beta: float = 0.0  # KL to the start model; 0: none (the paper's setting)
    inner_epochs: int = 1  # passes over each step's rollouts (1: on-policy, ratio 1)
    lora: LoraSettings | None = None  # None: full fine-tune
    mixed_precision: str = "no"  # "no" | "bf16": autocast around every transformer call (rollouts and re-scoring)
    base_dtype: str = "auto"  # frozen weights: "auto" (bf16 under mixed_precision bf16, else fp32) | fp32 | bf16 | fp8
    gradient_checkpointing: bool | None = None  # None: on above 1 B transformer parameters
    # Kept images re-scored per forward/backward (gradients accumulated: the same update as one pass over the
    # group); None: a whole group at once. 4 holds the pass to 4 images' activations (51.6 GiB instead of 70.2 for
    # the real model at G = 16, 512²: training/memory.py) for little speed on a GPU at these sequence lengths.
    policy_micro_batch: int | None = 4
    decode_batch: int = 4  # rollout images per VAE decode call
    cache_dir: str | None = None  # the prompts' encodings (`training.common.cache`); None: <output_dir>/cache
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    grid_every: int = 10  # a PNG grid of one group's rollouts every N steps (0: never)
    tensorboard: bool = True

    not_hashed = NOT_HASHED

    # What the shared data loader asks of a config (`training.common.data.load_rows`): one stage.
    @property
    def stages(self) -> list[Stage]:
        return [
            Stage(
                budget=self.budget or 1,
                steps=self.steps,
                lr=self.lr,
                batch_size=self.group_size * self.groups_per_step,
                output_size=self.output_size,
            )
        ]

    @property
    def total_steps(self) -> int:
        return self.steps

    @property
    def window(self) -> range:
        return range(*self.sde_window) if self.sde_window is not None else range(self.rollout_steps)


def _reward(data, i: int) -> RewardSpec:
    where = f"rewards[{i}]"
    if isinstance(data, str):
        data = {"source": data}
    if not isinstance(data, dict) or "source" not in data:
        raise ConfigError(f'{where} must be an object with a \'source\' (e.g. {{"source": "checker"}})')
    _check_keys(data, RewardSpec, where)
    spec = RewardSpec(**data)
    if not isinstance(spec.source, str) or not spec.source:
        raise ConfigError(f"{where}: source is {spec.source!r}: name a built-in source or 'package.module:factory'")
    if not isinstance(spec.weight, (int, float)) or isinstance(spec.weight, bool):
        raise ConfigError(f"{where}: weight is {spec.weight!r}: give a number")
    for key in ("options", "signal_weights"):
        if not isinstance(getattr(spec, key), dict):
            raise ConfigError(f"{where}: {key} must be an object")
    return spec


def config_from_dict(data: dict) -> RLConfig:
    if not isinstance(data, dict):
        raise ConfigError("the config must be an object (JSON) or a table (TOML) of keys")
    _check_keys(data, RLConfig, "the config")
    for key in ("model", "train_manifest"):
        if key not in data:
            raise ConfigError(f"the config has no {key!r}: it is required")
    kw = dict(data)
    kw["train_manifest"] = _paths(data["train_manifest"], "train_manifest")
    kw["model"] = model_arg(data["model"])  # a folder, or a built-in name
    if not kw["train_manifest"]:
        raise ConfigError("train_manifest is empty: give the JSONL manifest(s) whose rows are the prompts")
    rewards = data.get("rewards", [{"source": "checker"}])
    if not isinstance(rewards, list) or not rewards:
        raise ConfigError('rewards is empty: give at least one source, e.g. [{"source": "checker"}]')
    kw["rewards"] = [_reward(r, i) for i, r in enumerate(rewards)]
    kw["lora"] = _lora(data.get("lora"))
    if isinstance(data.get("betas"), list):  # JSON and TOML have no tuples; anything else fails check_types
        kw["betas"] = tuple(data["betas"])
    for key in ("budget", "output_size", "vl_budget"):
        kw[key] = _area(data.get(key), "the config", key, allow_none=True)
    cfg = RLConfig(**kw)
    check_types(cfg)
    _check(cfg)
    return cfg


def _check(cfg: RLConfig) -> None:
    where = "the config"
    if cfg.aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation is {cfg.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision is {cfg.mixed_precision!r}: use one of {', '.join(MIXED_PRECISION)}")
    check_precision(cfg)
    if cfg.policy_micro_batch is not None:
        _positive(cfg.policy_micro_batch, where, "policy_micro_batch")
    _positive(cfg.decode_batch, where, "decode_batch")
    _positive(cfg.group_size, where, "group_size", minimum=2)
    for key in ("steps", "groups_per_step", "rollout_steps", "inner_epochs", "keep_checkpoints", "log_every"):
        _positive(getattr(cfg, key), where, key)
    for key in ("save_every", "grid_every", "warmup"):
        _positive(getattr(cfg, key), where, key, minimum=0)
    check_seed(cfg.seed, where)
    check_output_dir(cfg.output_dir)
    for key, lo in (("lr", 0.0), ("eta", 0.0), ("clip_range", 0.0), ("adv_clip_max", 0.0)):
        v = getattr(cfg, key)
        if not isinstance(v, (int, float)) or not v > lo:
            raise ConfigError(f"{key} is {v!r}: give a positive number")
    if not isinstance(cfg.beta, (int, float)) or cfg.beta < 0:
        raise ConfigError(f"beta is {cfg.beta!r}: give 0 (no KL) or a positive KL weight")
    if not isinstance(cfg.cfg, (int, float)) or cfg.cfg < 1:
        raise ConfigError(f"cfg is {cfg.cfg!r}: 1 turns guidance off; give 1 or more")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ConfigError(f"max_grad_norm is {cfg.max_grad_norm!r}: give a positive norm or null for no clipping")
    if cfg.sde_window is not None:
        w = cfg.sde_window
        if len(w) != 2 or not all(isinstance(v, int) for v in w) or not 0 <= w[0] < w[1] <= cfg.rollout_steps:
            raise ConfigError(
                f"sde_window is {w!r}: give [first, stop) with 0 ≤ first < stop ≤ rollout_steps ({cfg.rollout_steps})"
            )
    # The last rollout step is deterministic (σ_next = 0): a window of only that step trains nothing.
    if not [n for n in cfg.window if n < cfg.rollout_steps - 1]:
        raise ConfigError(
            f"sde_window {cfg.sde_window} holds only the last rollout step, which takes no noise: start it earlier"
        )


def check_world(cfg: RLConfig, num_processes: int) -> None:
    """Whole groups per process: a group's statistics are never split across processes."""
    if cfg.groups_per_step % num_processes:
        raise ConfigError(
            f"groups_per_step {cfg.groups_per_step} does not split into whole groups over "
            f"{num_processes} process(es): use a multiple of {num_processes}"
        )


def load_config(path) -> RLConfig:
    return config_from_dict(read_config_data(path))
