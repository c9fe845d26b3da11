"""The test suite. Imported before its conftest, so the setting below is in force before torch is first imported."""

import os

# Two xdist workers share a 2-core machine (CI's): torch's default of one intra-op thread per core makes every
# torch-heavy test oversubscribe the CPU, and its threads spin-wait for each other whenever the host is busy
# (test_bench_pruning: under 17 s quiet, 81 s beside one CPU hog). One thread per worker, inherited by every
# component a test starts; code that times a number of threads sets it itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")
