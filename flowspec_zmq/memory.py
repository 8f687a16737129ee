"""Process memory: what a node holds resident, and giving freed memory back to the system.

glibc keeps freed heap memory (loading a draft layer by layer frees hundreds of MB in pieces, and
each worker thread's arena keeps its own), so a node's resident size would stay at its loading
peak; malloc_trim returns what is free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path


def return_free_memory() -> None:
    """Cheap (tens of microseconds): tensors are freed by reference counting already, so no
    garbage collection pass (a fifth of a second in a loaded process) is needed first."""
    libc = ctypes.util.find_library("c")
    if libc:  # glibc; elsewhere the allocator gives memory back on its own terms
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


def resident_mb(pid: int) -> float:
    """A process's resident memory (VmRSS) in MB; 0 when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
