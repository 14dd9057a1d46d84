"""Where the built-in default model lives (shipped in the repository, made by ``python -m training.build_default``).

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
    if path == SHIPPED_MODEL_DIR:
        raise UniRefError(
            f"the built-in default model is missing from {path}: it ships with the repository (restore it with "
            "`git checkout -- models/`, or rebuild it with `python -m training.build_default`), or pass --model DIR"
        )
    raise UniRefError(f"UNIREF_DEFAULT_MODEL points at {path}, which is not a model folder (no model_index.json): "
                      "fix the variable or unset it to use the built-in model")  # fmt: skip
