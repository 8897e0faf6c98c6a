"""Memory estimates and the refusal of steps that would not fit (see :func:`check_allocation`).

``--width 1000000000000`` would ask the allocator for terabytes; the process would die (or the
machine would swap) instead of saying why. This module imports nothing else of the package, so
the readers (``checkpoint``) and the guards can both use it.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional

import torch

from .errors import N2NError



def available_memory() -> Optional[int]:
    """Bytes of memory this process can still use: MemAvailable on Linux, else physical memory.

    Returns None where neither is known (then only :data:`MAX_ELEMENTS` applies).
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# No tensor may have more elements than this, whatever the memory: torch indexes with int64,
# and a count this large is a typo, not a model.
MAX_ELEMENTS = 2**48


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``: binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def tensor_bytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of `shape` and `dtype` (Python integers: no overflow for any shape)."""
    return math.prod(int(s) for s in shape) * dtype.itemsize


def check_allocation(nbytes: int, what: str, instead: str, elements: Optional[int] = None) -> None:
    """Refuse when `what` would need more memory than is available, before allocating any of it.

    Args:
        nbytes: the estimate, in bytes, of what the step holds in memory at its peak.
        what: the step, as the start of a sentence (``"widening 'fc1' to 10^12 units"``).
        instead: what would work (``"choose a smaller --width"``).
        elements: the largest single tensor's element count, checked against :data:`MAX_ELEMENTS`.

    Raises:
        N2NError: the estimate exceeds the available memory (or a tensor would be absurdly large).

    Example:
        >>> check_allocation(10**15, "widening 'fc1' to 10^12 units", "choose a smaller --width")
        Traceback (most recent call last):
        n2nsurgery.errors.N2NError: widening 'fc1' to 10^12 units would need about 909 TiB of memory, ...
    """
    limit = available_memory()
    too_many = elements is not None and elements > MAX_ELEMENTS
    if too_many or (limit is not None and nbytes > limit):
        have = f"more than the {format_bytes(limit)} available here" if limit is not None else "more than any machine has"
        raise N2NError(f"{what} would need about {format_bytes(nbytes)} of memory, {have}; {instead}")
