"""Where the built-in default model lives (shipped in the repository, trained by training/sft.py).

``UNIREF_DEFAULT_MODEL`` (a model folder) replaces it: for site set-ups and for tests.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UniRefError

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "uniref-default"


def default_model_dir() -> Path:
    override = os.environ.get("UNIREF_DEFAULT_MODEL")
    return Path(override).expanduser() if override else SHIPPED_MODEL_DIR


def default_model_path() -> Path:
    """The default model folder, or a clear error while there is none."""
    path = default_model_dir()
    if (path / "model_index.json").is_file():
        return path
    raise UniRefError(
        f"no built-in default model at {path}: pass --model DIR "
        "(a Qwen-Image-Edit-2509/2511 folder, or a test model from `python -m uniref_core make-tiny-model DIR`)"
    )
