"""The offline commands' allocator setting: page faults and time of batched passes, with and without it.

glibc serves large allocations with mmap and unmaps them when freed, so each batch's activations
page-fault in again, zeroed by the kernel. :func:`edgeprune.allocator.keep_large_allocations`
keeps them in the process. Each setting runs in a fresh interpreter (the setting is process-wide);
the settings alternate over the rounds so load from other processes falls on both alike. Fault
counts depend on the kernel and the C library, which is why they live here and not in a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

SETTINGS = ("default", "keep")

SCRIPT = """
import json, resource, sys, time, torch
from edgeprune.allocator import keep_large_allocations
if sys.argv[1] == "keep" and not keep_large_allocations():
    sys.exit("no glibc mallopt here")
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.randn(int(sys.argv[2]), 32, 32, 32)  # 128 kB per frame, as in a batched calibration pass
with torch.no_grad():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(int(sys.argv[3])):
        net(x)
    seconds = time.perf_counter() - t0
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "seconds": seconds}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=64, help="frames per batch (32x32x32 activations each)")
    parser.add_argument("--passes", type=int, default=5, help="timed passes per process")
    parser.add_argument("--rounds", type=int, default=5, help="processes per setting, alternating")


def measure(setting: str, batch: int, passes: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, setting, str(batch), str(passes)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    samples: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for setting in SETTINGS:
            samples[setting].append(measure(setting, args.batch, args.passes))
    rows = [{"allocator": setting, "page_faults_median": statistics.median(m["faults"] for m in mine),
             "seconds_median": statistics.median(m["seconds"] for m in mine)} for setting, mine in samples.items()]
    default, keep = rows
    ratios = [{"page_faults_avoided_per_pass": (default["page_faults_median"] - keep["page_faults_median"])
               / args.passes, "time_default_over_keep": default["seconds_median"] / keep["seconds_median"]}]
    title = f"{args.passes} passes of two 3x3 convs over a {args.batch}-frame batch, {args.rounds} processes each"
    return {"tables": {title: rows, "Default / keep": ratios}, "samples": samples, "batch": args.batch,
            "passes": args.passes, "rounds": args.rounds}
