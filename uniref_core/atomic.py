"""Folders written whole or not at all: everything goes into ``<final>.tmp``, then renames put it in place.

A crash at any point leaves the previous copy of ``final`` (or none) and at worst a ``.tmp`` folder, which
the next write of the same folder removes first.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import UniRefError

# The errors of a disk (or a quota) with no room left.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    try:
        os.replace(tmp, final)
    except OSError:
        if old.exists() and not final.exists():
            os.replace(old, final)  # the earlier copy back where it was
        raise
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


def write_error(e: OSError, what: str, folder, fix: str) -> UniRefError:
    """The message for ``what`` that could not be written into ``folder`` because of ``e``: a full disk says so and
    what to free (``fix`` ends it), any other error names itself."""
    reason = e.strerror or str(e)
    if e.errno in DISK_FULL:
        return UniRefError(
            f"{what} could not be written: the disk holding {folder} is full ({reason}); free space there, {fix}"
        )
    return UniRefError(
        f"{what} could not be written ({reason}{f': {e.filename}' if e.filename else ''}): check that "
        f"{folder} is a writable folder, {fix}"
    )
