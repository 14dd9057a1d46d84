"""Folders written whole or not at all: everything goes into ``<final>.tmp``, then renames put it in place.

A crash at any point leaves the previous copy of ``final`` (or none) and at worst a ``.tmp`` folder, which
the next write of the same folder removes first.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def tmp_path(final) -> Path:
    """Where ``final`` is built before it is committed."""
    final = Path(final)
    return final.with_name(final.name + ".tmp")


def fsync(path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: the renames made in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp, final, durable: bool = False) -> None:
    """Move the finished ``tmp`` folder to ``final``; an older copy is renamed away first and removed last.

    ``durable``: also fsync the parent folder, so the rename itself survives a power cut (checkpoints).
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)  # left by a crash between the renames of an earlier commit
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if durable:
        fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_dir(final):
    """Yield ``<final>.tmp`` (absent: the caller creates it) to write ``final`` into; on success it replaces
    ``final``, on an exception it is removed and the exception goes on."""
    tmp = tmp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier write's
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, final)
