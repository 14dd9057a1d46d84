"""Where the built-in models live (shipped in the repository, made by ``python -m training.build_default``).

Two ship: ``uniref-default``, the default everywhere a model is not given (the SFT model after MSGRPO),
and ``uniref-default-sft``, the same model before MSGRPO. Both are plain model folders under ``models/``;
the CLI's ``--model`` and the trainers' ``"model"`` take either name as well as a folder path.
``UNIREF_DEFAULT_MODEL`` (a model folder) replaces the default one: for site set-ups and for tests.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UniRefError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SHIPPED_MODEL_DIR = MODELS_DIR / "uniref-default"
#: Built-in model names → their folders, the default first.
BUILTIN_MODELS = {"uniref-default": SHIPPED_MODEL_DIR, "uniref-default-sft": MODELS_DIR / "uniref-default-sft"}


def default_model_dir() -> Path:
    override = os.environ.get("UNIREF_DEFAULT_MODEL")
    return Path(override).expanduser() if override else SHIPPED_MODEL_DIR


def builtin_model_dir(name: str) -> Path:
    """The folder of built-in model ``name`` (``uniref-default`` follows ``UNIREF_DEFAULT_MODEL``)."""
    return default_model_dir() if name == "uniref-default" else BUILTIN_MODELS[name]


def resolve_model_arg(spec) -> Path:
    """A model as a user names it: None (the default model), a built-in name, or a folder path.

    A folder that exists wins over a built-in name of the same spelling."""
    path = None if spec is None else Path(spec).expanduser()
    if path is not None and (str(spec) not in BUILTIN_MODELS or path.exists()):
        return path
    if spec is None or spec == "uniref-default":
        return default_model_path()
    folder = BUILTIN_MODELS[str(spec)]
    if not (folder / "model_index.json").is_file():
        raise UniRefError(f"the built-in model '{spec}' is missing from {folder}: {RESTORE}")
    return folder


#: How to get a shipped model folder back.
RESTORE = (
    "it ships with the repository (restore it with `git checkout -- models/`, or rebuild it with "
    "`python -m training.build_default`)"
)


def default_model_path() -> Path:
    """The default model folder, or a clear error while there is none."""
    path = default_model_dir()
    if (path / "model_index.json").is_file():
        return path
    if path == SHIPPED_MODEL_DIR:
        raise UniRefError(f"the built-in default model is missing from {path}: {RESTORE}, or pass --model DIR")
    raise UniRefError(
        f"UNIREF_DEFAULT_MODEL points at {path}, which is not a model folder (no model_index.json): "
        "fix the variable or unset it to use the built-in model"
    )
