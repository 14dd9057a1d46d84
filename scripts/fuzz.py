"""Fuzz the readers of user data for longer than CI does: the properties of tests/test_fuzz.py, fed fresh random
inputs round after round until the time is up, then a report of the executions and of every distinct crash (its
exception, where it was raised and the smallest input hypothesis found). Exit code 1 when anything crashed.

    .venv/bin/python scripts/fuzz.py --minutes 30
    .venv/bin/python scripts/fuzz.py --minutes 5 --only configs,lora --seed 1
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _crashes(error: BaseException) -> list[BaseException]:
    """The distinct failures in what hypothesis raised (one, or a group of them)."""
    inner = getattr(error, "exceptions", None)  # an ExceptionGroup (Python 3.11, or the backport on 3.10)
    if isinstance(inner, tuple):
        return [c for e in inner for c in _crashes(e)]
    return [error]


def _where(error: BaseException) -> str:
    """The innermost frame of the project's own code (or the library's, where ours is not on the stack)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if str(ROOT) in f.filename and "/.venv/" not in f.filename] or frames
    last = ours[-1] if ours else None
    return f"{Path(last.filename).relative_to(ROOT) if str(ROOT) in last.filename else last.filename}:{last.lineno}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/fuzz.py", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--examples", type=int, default=300, help="inputs per property per round (default 300)")
    p.add_argument("--only", default="", help="comma-separated property names (default: all); --list shows them")
    p.add_argument("--seed", type=int, default=None, help="seed of the rounds' seeds, to repeat a run")
    p.add_argument("--list", action="store_true", help="list the properties and exit")
    a = p.parse_args(argv)

    import test_fuzz
    from hypothesis import HealthCheck, given, seed, settings

    logging.getLogger("uniref_core").setLevel(logging.ERROR)  # a partly matching LoRA warns on every input
    warnings.simplefilter("ignore")  # PIL warns about every damaged TIFF tag

    if a.list:
        print("\n".join(test_fuzz.PROPERTIES))
        return 0
    names = [n for n in test_fuzz.PROPERTIES if not a.only or n in a.only.split(",")]
    unknown = set(filter(None, a.only.split(","))) - set(names)
    if unknown:
        p.error(f"unknown properties {', '.join(sorted(unknown))}; --list shows them")
    rng = random.Random(a.seed)
    crashes: dict[tuple, str] = {}  # (property, exception type, where) -> the smallest failing input
    start = time.monotonic()
    stop = start + a.minutes * 60
    rounds = 0
    try:
        while time.monotonic() < stop:
            for name in names:
                if time.monotonic() >= stop:
                    break
                strategy, check, _ = test_fuzz.PROPERTIES[name]
                options = settings(
                    max_examples=a.examples,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                try:
                    seed(rng.getrandbits(64))(options(given(strategy)(check)))()
                except KeyboardInterrupt:
                    raise
                except BaseException as error:  # noqa: BLE001 - every crash is reported, none stops the run
                    for crash in _crashes(error):
                        key = (name, type(crash).__name__, _where(crash))
                        if key not in crashes:
                            notes = "\n".join(getattr(crash, "__notes__", []))
                            crashes[key] = f"{type(crash).__name__}: {str(crash)[:300]}\n{notes[:1500]}"
                            print(f"[{name}] new crash {key[1]} at {key[2]}", flush=True)
            rounds += 1
            done = sum(test_fuzz.EXECUTIONS.values())
            minutes = (time.monotonic() - start) / 60
            line = f"round {rounds}: {done} executions, {len(crashes)} distinct crash(es), {minutes:.1f} min"
            print(line, flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    minutes = (time.monotonic() - start) / 60
    total = sum(test_fuzz.EXECUTIONS.values())
    print(f"\n{rounds} round(s), {total} executions in {minutes:.1f} min")
    for name in names:
        check = test_fuzz.PROPERTIES[name][1]
        print(f"  {name:16s} {test_fuzz.EXECUTIONS.get(check.__name__, 0):8d} executions")
    print(f"{len(crashes)} distinct crash(es)")
    for (name, kind, where), text in crashes.items():
        print(f"\n--- [{name}] {kind} at {where}\n{text}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
