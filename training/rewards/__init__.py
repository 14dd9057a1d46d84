"""Reward sources for MSGRPO: each scores a group's images and returns NAMED signals, one per thing it judges.

A source is a callable ``source(images, row) -> RewardBatch``: ``images`` are the G PIL images of one group
(same references, different noise), ``row`` the prompt they were made for (`training.common.data.Row`: references,
instruction, ShapeCompose ``spec`` when there is one). Each signal is one float per image, with a role:

- ``"reference"`` (with its 1-based ``reference`` index): how well the image keeps that reference;
- ``"instruction"``, ``"quality"``, or ``"other"``.

The aggregation (`training.rl.advantages`) combines signals by role: the minimum over the per-reference
ones, or their normalised sum, or a product. A source that could not score an image (a judge call that
failed) marks it in ``failed``: the image is dropped from its group and counted, never given a silent 0.

Sources are named in the RL config, ``{"source": "checker"}`` for a built-in one or a dotted path to your
own factory, ``{"source": "my_pkg.rewards:make_source", "options": {...}}``: the factory is called with
the options and returns the source. A dotted path imports and runs code, so only this project's ``training.``
modules load unless the user trusts others (``python -m training.msgrpo --trust-module my_pkg``, or
``trusted_modules`` of `load_source` and the trainer's ``run``): a config from elsewhere cannot run ``os:system``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from uniref_core.errors import UniRefError

ROLES = ("reference", "instruction", "quality", "other")
#: Built-in sources: name → "module:factory" (imported only when named, so a source's packages load lazily).
BUILTIN = {
    "checker": "training.rewards.checker:checker_source",
    "features": "training.rewards.features:feature_source",
    "judge": "training.rewards.judge:judge_source",
}

#: Packages whose factories any config may name: this project's own.
TRUSTED_PACKAGES = ("training",)


class RewardError(UniRefError):
    """A reward source that cannot be loaded or returned something unusable; the message names it."""


@dataclass
class Signal:
    values: np.ndarray  # [G] floats, finite where the image was scored
    role: str = "other"
    reference: int | None = None  # 1-based, for role "reference"


@dataclass
class RewardBatch:
    signals: dict[str, Signal]
    failed: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [G] True: not scored, drop it
    notes: list[str] = field(default_factory=list)  # why images failed (for the log)


Source = Callable[..., RewardBatch]


def is_trusted(module_name: str, trusted=()) -> bool:
    """Whether ``module_name`` is, or is inside, one of `TRUSTED_PACKAGES` or the ``trusted`` modules."""
    return any(module_name == t or module_name.startswith(t + ".") for t in (*TRUSTED_PACKAGES, *trusted))


def resolve(path: str, trusted=()):
    """``"pkg.mod:name"`` or ``"pkg.mod.name"`` → the object; clear errors for each way it can be wrong. Modules
    outside `TRUSTED_PACKAGES` and ``trusted`` are refused before they are imported (importing runs them)."""
    path = BUILTIN.get(path, path)
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RewardError(
            f"reward source {path!r}: name a built-in one ({', '.join(BUILTIN)}) or a factory as "
            "'package.module:function'"
        )
    if not is_trusted(module_name, trusted):
        raise RewardError(
            f"reward source {path!r}: module {module_name!r} is not trusted: a config's reward source "
            "runs as code with your rights, and only training.* modules load unless you trust others; "
            f"if you trust it, run with --trust-module {module_name}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(
            f"reward source {path!r}: module {module_name!r} cannot be imported ({e}); check the "
            "name and that it is on PYTHONPATH"
        ) from e
    obj = getattr(module, attr, None)
    if obj is None:
        raise RewardError(f"reward source {path!r}: module {module_name!r} has no {attr!r}")
    if not callable(obj):
        raise RewardError(f"reward source {path!r}: {attr!r} is not callable; name a factory that returns a source")
    return obj


def load_source(name: str, options: dict | None = None, trusted=()) -> Source:
    """Call the factory ``name`` resolves to with ``options``; the result must be a callable source. ``trusted``:
    modules (and their submodules) the user trusts beyond this project's own."""
    factory = resolve(name, trusted)
    try:
        source = factory(**(options or {}))
    except TypeError as e:
        raise RewardError(f"reward source {name!r}: its factory does not take these options ({e})") from None
    if not callable(source):
        raise RewardError(
            f"reward source {name!r}: the factory returned {type(source).__name__}, not a callable "
            "source(images, row) -> RewardBatch"
        )
    return source


def check_batch(batch, name: str, n: int) -> RewardBatch:
    """What a source returned, checked: a RewardBatch of [n] finite signals with known roles."""
    if not isinstance(batch, RewardBatch):
        raise RewardError(f"reward source {name!r} returned {type(batch).__name__}: return a RewardBatch")
    failed = np.zeros(n, bool) if batch.failed.size == 0 else np.asarray(batch.failed, bool)
    if failed.shape != (n,):
        raise RewardError(f"reward source {name!r}: failed has shape {failed.shape}, expected ({n},) for {n} images")
    if not batch.signals:
        raise RewardError(f"reward source {name!r} returned no signals")
    checked = {}
    for key, sig in batch.signals.items():
        values = np.asarray(sig.values, dtype=np.float64)
        if values.shape != (n,):
            raise RewardError(
                f"reward source {name!r}: signal {key!r} has shape {values.shape}, expected ({n},) "
                f"(one value per image of the group)"
            )
        bad = ~np.isfinite(values) & ~failed
        if bad.any():
            raise RewardError(
                f"reward source {name!r}: signal {key!r} is {values[bad][0]} for image "
                f"{int(np.flatnonzero(bad)[0])}, which is not marked failed: return finite scores, "
                "or mark the image in RewardBatch.failed"
            )
        if sig.role not in ROLES:
            raise RewardError(
                f"reward source {name!r}: signal {key!r} has role {sig.role!r}; use one of {', '.join(ROLES)}"
            )
        if sig.role == "reference" and not (isinstance(sig.reference, int) and sig.reference >= 1):
            raise RewardError(
                f"reward source {name!r}: signal {key!r} has role 'reference' but no 1-based reference index"
            )
        checked[f"{name}/{key}"] = Signal(values, sig.role, sig.reference)
    return RewardBatch(checked, failed, list(batch.notes))


def merge(batches: list[RewardBatch], n: int) -> RewardBatch:
    """All sources' signals of one group; an image failed by any source is failed."""
    out = RewardBatch({}, np.zeros(n, bool))
    for b in batches:
        out.signals.update(b.signals)
        out.failed |= b.failed
        out.notes += b.notes
    return out


def finite_mean(values) -> float:
    v = [float(x) for x in values if math.isfinite(float(x))]
    return float(np.mean(v)) if v else float("nan")
