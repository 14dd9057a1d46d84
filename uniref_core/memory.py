"""Giving freed host memory back to the system.

glibc's malloc keeps what a process frees for its next allocations, and it can return only the free pages at the top
of each heap: one block still in use above a large freed one pins it. A run makes and drops activations of many
sizes, so a long-lived process (a ComfyUI server) holds more and more freed memory in steps of tens of MiB.
``malloc_trim(0)`` returns every whole free page, wherever it lies.
"""

from __future__ import annotations

import ctypes


def trim_host_heap() -> None:
    """Return glibc's free heap pages to the system; nothing where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        pass
