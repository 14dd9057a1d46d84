"""Put the pack's example reference images into ComfyUI's input folder, so the example workflows'
LoadImage nodes find them. Existing files are never overwritten."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import folder_paths

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets"
PREFIX = "uniref_"


def install_example_images() -> None:
    try:
        target = Path(folder_paths.get_input_directory())
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(EXAMPLES_DIR.glob("*.png")):
            dst = target / (PREFIX + src.name.removeprefix("ref_"))
            if not dst.exists():
                shutil.copyfile(src, dst)
    except OSError as e:  # a read-only input folder must not stop the nodes from loading
        logging.warning("UniRef: could not copy example images into the input folder: %s", e)
