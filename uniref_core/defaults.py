"""Where the built-in default model lives (shipped in the repository, trained by training/sft.py)."""

from __future__ import annotations

from pathlib import Path

from .errors import UniRefError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "uniref-default"


def default_model_path() -> Path:
    """The default model folder, or a clear error while the repository does not ship one yet."""
    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        return DEFAULT_MODEL_DIR
    raise UniRefError(
        f"no built-in default model at {DEFAULT_MODEL_DIR}: pass --model DIR "
        "(a Qwen-Image-Edit-2509/2511 folder, or a test model from `python -m uniref_core make-tiny-model DIR`)"
    )
