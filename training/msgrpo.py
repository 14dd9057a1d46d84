"""``python -m training.msgrpo --config …`` (also under ``accelerate launch`` and ``torchrun``): the MSGRPO
trainer, `training.rl.trainer`."""

import sys

from .rl.trainer import main

if __name__ == "__main__":
    sys.exit(main())
