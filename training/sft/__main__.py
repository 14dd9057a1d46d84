"""``python -m training.sft --config …`` (also under ``accelerate launch`` and ``torchrun``)."""

import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main())
