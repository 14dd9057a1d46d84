"""What every training command does with a UniRefError (one line on stderr that names the problem, exit 2),
and the command line the two trainers share."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from uniref_core.atomic import DISK_FULL, write_error
from uniref_core.errors import UniRefError


def exit_on_error(main):
    """Wrap a ``main(argv) -> int`` so a UniRefError prints ``error: …`` instead of a stack trace; so does a full
    disk met by any write the trainers make (a log line, an evaluation grid, the cache), naming the file."""

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        try:
            return main(argv)
        except UniRefError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            where = Path(e.filename).parent if e.filename else Path.cwd()
            print(
                f"error: {write_error(e, str(e.filename or 'a file'), where, 'then continue with --resume auto')}",
                file=sys.stderr,
            )
            return 2

    return wrapper


def trainer_main(
    argv, *, prog: str, description: str, config_help: str, load_config, run, reward_modules: bool = False
) -> int:
    """``--config`` and ``--resume``, then ``run(load_config(config), resume)``; the main process says where
    the outputs went (``run``'s result has ``is_main``, ``global_step`` and ``output_dir``). ``reward_modules``:
    also ``--trust-module`` (repeatable), passed to ``run`` as ``trusted_modules``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(
        "--resume", default=None, help="'auto' (newest checkpoint of output_dir, if any) or a checkpoint folder"
    )
    if reward_modules:
        parser.add_argument(
            "--trust-module",
            action="append",
            default=[],
            metavar="MODULE",
            help="let the config's reward sources load factories from MODULE (and its submodules); "
            "they run as code with your rights, so name only modules you trust (repeat for several)",
        )
    args = parser.parse_args(argv)
    extra = {"trusted_modules": tuple(args.trust_module)} if reward_modules else {}
    result = run(load_config(args.config), resume=args.resume, **extra)
    if result.is_main:
        print(f"done: {result.global_step} steps; outputs in {result.output_dir}")
    return 0
