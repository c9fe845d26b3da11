"""Keep freed tensor memory in the process during offline batch work (training, calibration, benchmarks).

By default glibc serves large allocations with mmap and unmaps them when freed, so the next
batch's activations of the same size page-fault in again, zeroed by the kernel: five passes of
two 3x3 convs over a 64-frame batch of 32x32x32 activations took 61,188 page faults here, 2,048
with this setting, and 1.95x as long without it (`edgeprune bench allocator`, medians of 5
processes each on the shared 2-core machine). A 4-ratio entry-table calibration ran in 44.0 s
without it and 21.9 s with it. Only the offline commands call this: a node agent runs batch 1
and should give memory back on a small device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_allocations() -> bool:
    """Raise glibc's mmap and trim thresholds; False (and nothing changed) off glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt here: allocator left as it is")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
