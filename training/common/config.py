"""Config pieces the SFT and RL configs share: the error type, the hash that guards a resume, the stage
the shared data loader reads, LoRA settings, the key and value checks, and reading JSON or TOML (a file may
override a base file).

Sizes (``budget``, ``output_size``, ``vl_budget``) are areas: 256 means 256², "1536x1024" a
rectangle's area, a number ≥ 65536 a pixel count (`uniref_core.budget.parse_area`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from uniref_core.budget import parse_area
from uniref_core.defaults import resolve_model_arg
from uniref_core.errors import UniRefError

# Linear layers of QwenImageTransformer2DModel's blocks (diffusers transformer_qwenimage.py): joint
# attention projections of both streams and both MLPs. ComfyUI's qwen_image model uses the same names.
DEFAULT_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
MIXED_PRECISION = ("no", "bf16")
# The frozen base's dtype: "auto" follows mixed_precision (bf16 under bf16, else fp32). Trainable weights are fp32.
BASE_DTYPES = ("auto", "fp32", "bf16", "fp8")
# Above this many transformer parameters gradient checkpointing is on unless a config says otherwise.
CHECKPOINTING_ABOVE = 1_000_000_000


class ConfigError(UniRefError):
    """A config that cannot be trained; the message names the key and the fix."""


@dataclass
class Stage:
    """One step of the progressive-budget ladder (an RL config is one stage: ``RLConfig.stages``), what the
    shared row loader (`common.data.load_rows`) checks every row against."""

    budget: int  # reference pixel budget (areas parse like "1024" → 1024²)
    steps: int  # optimizer steps in this stage
    lr: float
    batch_size: int  # global batch: the same whatever the number of processes
    output_size: int | None = None  # target area; None trains each target at its own size
    micro_batch_size: int | None = None  # None: the top-level ``micro_batch_size``
    warmup: int | None = None  # None: the top-level ``warmup``
    schedule: str | None = None  # None: the top-level ``schedule``

    @property
    def label(self) -> str:
        side = math.isqrt(self.budget)
        return f"{side}²" if side * side == self.budget else f"{self.budget}px"


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    dropout: float = 0.0


class HashedConfig:
    """A config dataclass whose fields, less ``not_hashed``, decide the trained weights (resume checks)."""

    not_hashed: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hashed_dict(self) -> dict:
        """The fields that decide the trained weights (what a resumed run must share)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.not_hashed}

    def hash(self) -> str:
        text = json.dumps(self.hashed_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------------------


def _check_keys(data: dict, cls, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {key!r} in {where}: {hint}")


def _area(value, where: str, key: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    try:
        area = parse_area(value)
    except UniRefError:
        raise ConfigError(f"{where}: {key} is {value!r}: write 1024 (for 1024²), 1536x1024 or a pixel count") from None
    if area <= 0:
        raise ConfigError(f"{where}: {key} is {value!r}: give a positive size such as 1024 (for 1024²)")
    return area


def _positive(value, where: str, key: str, kind=int, minimum=1) -> None:
    # is_integer() and isfinite(), not int(): int() of Infinity or NaN (both JSON and TOML numbers) raises
    odd = isinstance(value, float) and not (value.is_integer() if kind is int else math.isfinite(value))
    if not isinstance(value, (int, float)) or isinstance(value, bool) or odd:
        raise ConfigError(f"{where}: {key} is {value!r}: it must be a {'whole number' if kind is int else 'number'}")
    if value < minimum:
        raise ConfigError(f"{where}: {key} is {value!r}: it must be at least {minimum}")


def check_types(cfg, where: str = "") -> None:
    """Every field of a config dataclass, nested ones included, of the type it declares, so that no check after this
    one and no trainer meets a string where a number belongs, NaN or Infinity (numbers to JSON and TOML), or a list
    where a flag belongs; a whole number written 2.0 becomes 2. The error names the key and the type."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value, hint = f"{where}{f.name}", getattr(cfg, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            check_types(value, f"{key}.")
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            for i, item in enumerate(value):
                check_types(item, f"{key}[{i}].")
        elif not _conforms(value, hint):
            raise ConfigError(f"{key} is {value!r}: it must be {_describe(hint)}")
        elif isinstance(value, float) and int in (hint, *typing.get_args(hint)):
            setattr(cfg, f.name, int(value))


def _conforms(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint in (type(None), bool, str):
        return type(value) is hint
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return number and (isinstance(value, int) or value.is_integer())
    if hint is float:
        return number and (isinstance(value, int) or math.isfinite(value))
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_conforms, value, args))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True  # a nested dataclass: check_types goes through its fields


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ')}s"
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    names = {
        int: "a whole number",
        float: "a finite number",
        bool: "true or false",
        str: "a string",
        dict: "an object",
    }
    return names.get(hint, "null" if hint is type(None) else getattr(hint, "__name__", str(hint)))


def model_arg(value) -> str:
    """A config's ``model``: a model folder or a built-in model's name (None: the default model)."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"model is {value!r}: give a model folder or a built-in model's name such as uniref-default")
    return str(resolve_model_arg(value))


# accelerate's set_seed seeds numpy's global generator, which takes 32-bit seeds only.
MAX_SEED = 2**32 - 1


def check_seed(value, where: str = "the config") -> None:
    """A run's ``seed``: a whole number from 0 to `MAX_SEED`."""
    _positive(value, where, "seed", minimum=0)
    if value > MAX_SEED:
        raise ConfigError(
            f"{where}: seed is {value}: it must be at most {MAX_SEED} (numpy's generators, which the "
            "trainers seed, take 32 bits); give a smaller seed"
        )


def check_output_dir(value, key: str = "output_dir") -> None:
    """``output_dir`` must be a folder or a path one can be made at: not an existing file, nor under one."""
    if not isinstance(value, (str, Path)) or not str(value) or "\x00" in str(value):
        raise ConfigError(f"{key} is {value!r}: give the path of a folder for the run's checkpoints and logs")
    path = Path(value).expanduser()
    for part in (path, *path.parents):
        try:
            found = part.exists() or part.is_symlink()
        except OSError as e:  # a name longer than the file system allows, a loop of links, …
            raise ConfigError(f"{key} {value!r} is not a usable path ({e.strerror}): give a folder path") from None
        if found:
            if not part.is_dir():
                what = "is a file" if part == path else f"is under {part}, which is a file"
                raise ConfigError(f"{key} {value} {what}, not a folder: give a folder path (a new one is created)")
            return


def _lora(data) -> LoraSettings | None:
    """A config's ``lora`` value checked: None (a full fine-tune) or the adapters' settings."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError("lora must be an object {rank, alpha, targets} or null for a full fine-tune")
    _check_keys(data, LoraSettings, "lora")
    lora = LoraSettings(**data)
    _positive(lora.rank, "lora", "rank")
    return lora


def base_dtype(cfg) -> str:
    """The frozen base's dtype for ``cfg`` ("fp32", "bf16" or "fp8"), "auto" resolved."""
    if cfg.base_dtype == "auto":
        return "bf16" if cfg.mixed_precision == "bf16" else "fp32"
    return cfg.base_dtype


def check_precision(cfg) -> None:
    """base_dtype against mixed_precision and the kind of run (SFT and RL configs alike)."""
    if cfg.base_dtype not in BASE_DTYPES:
        raise ConfigError(f"base_dtype is {cfg.base_dtype!r}: use one of {', '.join(BASE_DTYPES)}")
    if base_dtype(cfg) != "fp32" and cfg.mixed_precision != "bf16":
        raise ConfigError(
            f'base_dtype {cfg.base_dtype} runs the frozen model in bf16: set mixed_precision "bf16" '
            'as well, or base_dtype "fp32"'
        )
    if cfg.base_dtype == "fp8" and cfg.lora is None:
        raise ConfigError(
            "base_dtype fp8 is for LoRA training (a full fine-tune trains every weight, in fp32): set "
            'lora, or base_dtype "bf16"'
        )
    if cfg.gradient_checkpointing not in (None, True, False):
        raise ConfigError(
            f"gradient_checkpointing is {cfg.gradient_checkpointing!r}: true, false, or null for on "
            "above 1 B transformer parameters"
        )


def _paths(value, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{key} must be a path or a list of paths, got {value!r}")


#: The key by which a config file names the file it overrides (`read_config_data`).
BASE_KEY = "base"


def read_config_data(path) -> dict:
    """The plain data of a ``.json`` or ``.toml`` config file (SFT and RL configs alike), its base merged in.

    A file may name a base config, ``"base": "sft_base.json"``, as a path relative to the file itself; the base
    may name its own. The file's keys are merged onto its base's (`merge_config_data`): tables key by key, the
    file winning; any other value, a list included, replaces the base's whole.
    """
    return _read_with_base(Path(path), ())


def _read_with_base(path: Path, chain: tuple[Path, ...]) -> dict:
    chain = chain + (path.resolve(),)
    data = _read_file(path)
    if not isinstance(data, dict) or BASE_KEY not in data:
        return data
    data = dict(data)
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"config file {path}: {BASE_KEY} is {base!r}: give the path of the config it overrides, "
            f"relative to {path.parent}"
        )
    base_path = path.parent / base
    try:
        found = base_path.is_file()
        resolved = base_path.resolve()
    except (OSError, ValueError) as e:  # a NUL byte, a name too long for the file system, a loop of links
        raise ConfigError(
            f"config file {path}: its {BASE_KEY} {base!r} is not a usable path ({e}): give the path of the config "
            f"it overrides, relative to {path.parent}"
        ) from None
    if resolved in chain:
        names = " → ".join(str(p) for p in chain + (base_path.resolve(),))
        raise ConfigError(
            f"config file {path}: its {BASE_KEY} {base!r} is circular ({names}): a base may not name a "
            "file that names it"
        )
    if not found:
        raise ConfigError(
            f"config file {path}: its {BASE_KEY} {base!r} ({base_path}) does not exist: give a path "
            f"relative to {path.parent}"
        )
    base_data = _read_with_base(base_path, chain)
    if not isinstance(base_data, dict):
        raise ConfigError(f"config file {base_path} (the {BASE_KEY} of {path}) must be an object of keys")
    return merge_config_data(base_data, data)


def merge_config_data(base: dict, override: dict) -> dict:
    """``override`` merged onto ``base``: tables recursively, any other value (a list too) replaced whole."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config_data(out[key], value)
        else:
            out[key] = value
    return out


def _read_file(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {path} could not be read: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e}): save it as UTF-8") from None
    try:
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise ConfigError(
            f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}"
        ) from None


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two hashed config dicts: 'stages[0].lr: 0.0001 → 0.0002'."""
    out = []
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            out += diff_configs(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
    elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            out += diff_configs(a, b, f"{prefix}[{i}]")
    elif old != new:
        out.append(f"{prefix}: {old!r} → {new!r}")
    return out
