"""The offline commands' allocator setting is applied: large buffers stop being mmapped, so freed activations stay.

How many page faults and how much time that saves depends on the kernel and the load: those
figures come from `edgeprune bench allocator`, not from here.
"""

from __future__ import annotations

import argparse
import ctypes.util
import subprocess
import sys

import pytest

# glibc's own count of blocks it currently serves with mmap (mallinfo2().hblks) while 64 MB are held.
SCRIPT = """
import ctypes, sys
from edgeprune.allocator import keep_large_allocations
if sys.argv[1] == "keep":
    assert keep_large_allocations()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks
buffer = libc.malloc(64 << 20)  # above glibc's largest dynamic mmap threshold (32 MB)
print(libc.mallinfo2().hblks - before)
libc.free(buffer)
"""


def mmapped_blocks(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(ctypes.util.find_library("c") is None or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc >= 2.33 only")
def test_keep_large_allocations_serves_large_buffers_from_the_heap():
    assert mmapped_blocks("default") == 1  # glibc would hand the 64 MB back to the OS on free
    assert mmapped_blocks("keep") == 0


def test_the_bench_command_applies_it(monkeypatch):
    """Every benchmark runs with the setting (training and calibration batches alike)."""
    from edgeprune.commands import bench

    applied = []
    monkeypatch.setattr("edgeprune.allocator.keep_large_allocations", lambda: applied.append(True) or True)
    monkeypatch.setattr("edgeprune.bench.allocator.run", lambda args: {"tables": {}})
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "allocator"])
    assert args.func(args) == 0 and applied == [True]
