"""What every training command does with a UniRefError: one line on stderr that names the problem, exit 2."""

from __future__ import annotations

import functools
import sys

from uniref_core.errors import UniRefError


def exit_on_error(main):
    """Wrap a ``main(argv) -> int`` so a UniRefError prints ``error: …`` instead of a stack trace."""

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        try:
            return main(argv)
        except UniRefError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper
