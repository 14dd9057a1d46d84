"""SFT: the flow-matching trainer (`trainer.run`), its config, its data batching and its loss.

python -m training.sft --config training/configs/tiny_shapecompose.json [--resume auto|PATH]
"""

from .trainer import run

__all__ = ["run"]
