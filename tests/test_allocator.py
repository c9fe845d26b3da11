"""The offline commands' allocator setting: freed activations stay in the process on glibc."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from edgeprune.allocator import keep_large_allocations
if sys.argv[1] == "keep":
    assert keep_large_allocations()
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.randn(64, 32, 32, 32)  # 8 MB activations, as in a batched calibration pass
with torch.no_grad():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="glibc only")
def test_batched_passes_stop_page_faulting_their_activations_back_in():
    faults = {mode: int(subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("keep", "default")}
    assert faults["default"] > 20_000  # glibc returned each activation to the OS and faulted it back
    assert faults["keep"] < faults["default"] / 5
