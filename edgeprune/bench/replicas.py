"""Replicated stages against one pipeline: SLO attainment, throughput and measured accuracy at rising arrival rates.

Strategies, each on a fresh emulated cluster (the pipeline benchmark's machinery: mosquitto, the gateway,
one node agent per node and a labelled camera as real subprocesses; a node of device speed k sleeps (k − 1) ×
its slice's calibrated compute, so four nodes share this host without burning it):

* ``pipeline``: one pipeline over all nodes (``[gateway] placement_mode = "pipeline"``), no pruning;
* ``data``: the whole model on every node, replicas of one stage (``placement_mode = "data"``), no pruning;
* ``hybrid``: the hybrid planner's plan for the highest rate (``placement_mode = "hybrid"``), no pruning;
* ``parallel``: the hybrid planner's best plan of at least two parallel pipelines for the highest rate
  (``placement_mode = "parallel"``), no pruning;
* ``hybrid+prune``: the same plan with the pruning controller (bottleneck policy) pruning per node.

Each cluster first takes ``--warmup-s`` of traffic at the highest rate (not counted: the controller reacts to
the load there), then fixed-rate labelled frames at every rate in turn (``--step-s`` seconds each, a fresh camera
id per rate, and the backlog drained in between). A strategy *sustains* a rate when it and every lower
rate tried meet ``--attainment`` (a frame that fails or misses the SLO counts against it). Also: the hybrid
planner's solve time for 10, 20 and 50 distinct nodes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from edgeprune.bench.pipeline import PolicyRun, Scenario
from gateway.store import Reader

STRATEGIES = ("pipeline", "data", "hybrid", "parallel", "hybrid+prune")
MODE = {"pipeline": "pipeline", "data": "data", "hybrid": "hybrid", "parallel": "parallel", "hybrid+prune": "hybrid"}
NODES = {"node-1": 10.0, "node-2": 15.0, "node-3": 20.0, "node-4": 30.0}  # device speed: × this host's compute
# The controller reacts within one step. Its stage budget (budget_fraction × SLO / stages) is what a replica is
# pruned to meet once the SLO is violated: 0.2 × 0.3 s = 60 ms for a one-stage plan, below the two slowest
# nodes' whole model (~70 and ~110 ms emulated), above the two fastest.
CONTROLLER = {"trigger_window_s": 4, "trigger_min_span_s": 2, "cooldown_s": 4, "min_samples": 5,
              "budget_fraction": 0.2, "slowdown_gone": 1.5}


def add_arguments(parser) -> None:
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated subset of "
                        f"{', '.join(STRATEGIES)}")
    parser.add_argument("--rates", default="8,16,24,32,40,48", help="arrival rates to try, frames/s, ascending")
    parser.add_argument("--step-s", type=float, default=20.0, help="seconds of traffic per rate")
    parser.add_argument("--slo-s", type=float, default=0.3, help="end-to-end latency objective, seconds")
    parser.add_argument("--warmup-s", type=float, default=20.0, help="seconds of traffic at the highest rate before "
                        "the measured rates, not counted (the controller reacts to load here, not in a measured "
                        "step; every strategy gets it); 0: none")
    parser.add_argument("--attainment", type=float, default=0.95, help="share of frames within the SLO that "
                        "counts as sustained")
    parser.add_argument("--planner-sizes", default="10,20,50", help="node counts for the planner's solve time")
    parser.add_argument("--quick", action="store_true", help="two rates of 3 s each on the two fastest nodes, and the "
                        "planner at 10 nodes "
                        "(a test of the machinery, not a measurement)")
    parser.add_argument("--run-dir", type=Path, default=Path("run/bench-replicas"), help="logs and databases")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write the attainment and accuracy plot here "
                        "(e.g. docs/replicas-bench.png)")


def sustainable(points: list[dict], attainment: float) -> float:
    """The highest rate such that it and every lower rate tried reached ``attainment`` (0 if the lowest did not)."""
    best = 0.0
    for point in sorted(points, key=lambda p: p["arrival_hz"]):
        if point["attainment"] is None or point["attainment"] < attainment:
            break
        best = point["arrival_hz"]
    return best


def planner_times(sizes: list[int], seed: int = 0) -> list[dict]:
    """Solve time of the hybrid planner for one pipeline with replicas (``max_parallel=1``) for n nodes, each its own
    device: TrapNet's shipped profile × a log-uniform 1-8× speed with ±10 % per block, so no two nodes merge."""
    from edgeprune.demo import DEMO_PROFILE
    from gateway.hybrid import HybridRequest, plan_hybrid
    from gateway.placement import Device, problem_from_profiles
    from shared.profiling import load_profile

    blocks = load_profile(DEMO_PROFILE).blocks
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        speeds = np.exp(rng.uniform(0, np.log(8), n))
        profiles = {f"n{i}": [b.model_copy(update={"latency_s": b.latency_s * s * rng.uniform(0.9, 1.1)})
                              for b in blocks] for i, s in enumerate(speeds)}
        devices = [Device(d, 64e6, 100e6 / 8) for d in profiles]
        problem = problem_from_profiles(profiles, devices, frame_bytes=0, camera_bandwidth_bps=1.0)
        started = time.perf_counter()
        plan = plan_hybrid(HybridRequest(problem, 50.0, 0.4), max_parallel=1)
        rows.append({"nodes": n, "blocks": len(blocks), "solve_s": time.perf_counter() - started,
                     "plan": plan.kind, "stages": len(plan.pipelines[0]),
                     "predicted_sustainable_hz": plan.sustainable_hz})
    return rows


class StrategyRun(PolicyRun):
    """One strategy's cluster: the pipeline benchmark's run with the placement mode and controller set."""

    def __init__(self, strategy: str, top_hz: float, slo_s: float, run_dir: Path, nodes: dict[str, float]):
        scenario = Scenario(name="replicas", description=strategy, duration_s=0.0, slo_s=slo_s, window_s=5.0,
                            seed=0, nodes=dict(nodes), imbalance={}, slowdowns=(), arrivals={},
                            controller=dict(CONTROLLER))
        super().__init__(scenario, "bottleneck" if strategy == "hybrid+prune" else "none", run_dir)
        self.opt.env.update({"EDGEPRUNE_GATEWAY_PLACEMENT_MODE": MODE[strategy],
                             "EDGEPRUNE_GATEWAY_HYBRID_ARRIVAL_HZ": str(top_hz),
                             "EDGEPRUNE_GATEWAY_RESULT_TIMEOUT_S": "60"})

    def step(self, index: int | str, rate: float, step_s: float) -> dict:
        """Fixed-rate labelled frames for ``step_s``; the backlog drained before the figures are read."""
        camera = f"rate{index}"
        sent = max(5, int(rate * step_s))
        self.opt.camera_args = ("--camera-id", camera, "--labelled", "--arrival", "fixed", "--rate", f"{rate:.3f}",
                                "--count", str(sent))
        self.start_camera()
        self.site.procs["camera"].wait(timeout=step_s * 4 + 120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Reader(self.db).accounting()["in_flight"] > 0:
            time.sleep(0.5)
        time.sleep(1.0)
        rows = Reader(self.db).frames(camera)
        latency = np.array([r["e2e_s"] for r in rows])
        correct = [r["correct"] for r in rows if r["correct"] is not None]
        span = rows[-1]["finish_ts"] - rows[0]["capture_ts"] if len(rows) > 1 else None
        ratios = [r for row in rows for r in row["prune_ratios"]]
        return {"arrival_hz": rate, "sent": sent, "results": len(rows),
                "attainment": float((latency <= self.scenario.slo_s).sum()) / sent,
                "throughput_hz": len(rows) / span if span else None,
                "p95_s": float(np.percentile(latency, 95)) if rows else None,
                "accuracy_measured": float(np.mean(correct)) if correct else None, "labelled": len(correct),
                "mean_prune_ratio": float(np.mean(ratios)) if ratios else None}


def run_strategy(strategy: str, rates: list[float], args, nodes: dict[str, float]) -> dict:
    bench = StrategyRun(strategy, max(rates), args.slo_s, args.run_dir / strategy.replace("+", "-"), nodes)
    points = []
    try:
        bench.start_pipeline()
        bench.prepare()
        placement = Reader(bench.db).placement()
        if args.warmup_s > 0:
            print(f"\r{strategy:>13}: warm-up at {max(rates):g} frames/s", end="", file=sys.stderr, flush=True)
            bench.step("warmup", max(rates), args.warmup_s)
        for k, rate in enumerate(rates):
            print(f"\r{strategy:>13}: rate {k + 1}/{len(rates)} ({rate:g} frames/s)", end="", file=sys.stderr,
                  flush=True)
            points.append({"strategy": strategy, **bench.step(k, rate, args.step_s)})
    finally:
        bench.stop_processes()
    print(file=sys.stderr)
    stages = [{"pipeline": s.get("pipeline", 0), "blocks": [s["first_block"], s["last_block"]],
               "nodes": [s["node_id"], *s.get("replicas", [])]} for s in placement["stages"]]
    return {"placement": stages, "points": points}


def run(args) -> dict:
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    rates = [2.0, 6.0] if args.quick else [float(r) for r in args.rates.split(",")]
    step_s = 3.0 if args.quick else args.step_s
    args.step_s = step_s
    args.warmup_s = 0.0 if args.quick else args.warmup_s
    sizes = [10] if args.quick else [int(n) for n in args.planner_sizes.split(",")]
    nodes = dict(list(NODES.items())[:2]) if args.quick else dict(NODES)
    runs = {s: run_strategy(s, rates, args, nodes) for s in strategies}
    points = [p for r in runs.values() for p in r["points"]]
    sustained = {s: sustainable(r["points"], args.attainment) for s, r in runs.items()}
    unpruned = [p["accuracy_measured"] for p in points if p["strategy"] != "hybrid+prune"
                and p["accuracy_measured"] is not None]
    floor = 0.9 * float(np.mean(unpruned)) if unpruned else None  # [controller] accuracy_floor_relative default
    singles = {s: r for s, r in sustained.items() if s != "hybrid+prune"}
    best_single = max(singles.values(), default=0.0)
    planner = planner_times(sizes)
    document = {
        "quick": args.quick, "slo_s": args.slo_s, "step_s": step_s, "warmup_s": args.warmup_s,
        "attainment_target": args.attainment,
        "nodes": nodes, "controller": CONTROLLER, "host": {"cpus": os.cpu_count(),
                                                           "load_avg_1m_at_end": os.getloadavg()[0]},
        "emulation": "sleep: a node of device speed k sleeps (k-1) x its slice's calibrated compute at the ratio "
                     "it runs; arrivals: fixed rate, labelled frames",
        "placements": {s: r["placement"] for s, r in runs.items()},
        "rates": points, "sustainable_hz": sustained,
        "highest_rate_meeting_hz": {s: max([p["arrival_hz"] for p in r["points"]
                                            if p["attainment"] >= args.attainment], default=0.0)
                                    for s, r in runs.items()},
        "best_single_strategy_hz": best_single,
        "hybrid_prune_gain": (sustained["hybrid+prune"] / best_single
                              if "hybrid+prune" in sustained and best_single else None),
        "accuracy_floor_measured": floor,
        "hybrid_prune_min_accuracy": min((p["accuracy_measured"] for p in points if p["strategy"] == "hybrid+prune"
                                          and p["accuracy_measured"] is not None), default=None),
        "planner": planner,
    }
    document["tables"] = {
        "bench replicas: per strategy and arrival rate": [
            {"strategy": p["strategy"], "arrival_hz": p["arrival_hz"], "attain_%": 100 * p["attainment"],
             "throughput_hz": p["throughput_hz"], "p95_ms": None if p["p95_s"] is None else 1000 * p["p95_s"],
             "acc_meas": p["accuracy_measured"], "mean_ratio": p["mean_prune_ratio"], "results": p["results"],
             "sent": p["sent"]} for p in points],
        f"sustainable rate (every rate up to it at >= {args.attainment:.0%} within the SLO)": [
            {"strategy": s, "sustainable_hz": r, "placement": shown(runs[s]["placement"])}
            for s, r in sustained.items()],
        "hybrid planner solve time (one pipeline with replicas, distinct nodes)": planner,
    }
    if args.plot:
        plot(document, args.plot)
        print(f"wrote {args.plot}")
    return document


def shown(stages: list[dict]) -> str:
    """``a:0-3 | b:4-5`` per pipeline, pipelines apart by `` || ``; a stage's replicas joined by ``+``."""
    pipelines: dict[int, list[str]] = {}
    for st in stages:
        pipelines.setdefault(st.get("pipeline", 0), []).append(
            f"{'+'.join(st['nodes'])}:{st['blocks'][0]}-{st['blocks'][1]}")
    return " || ".join(" | ".join(p) for _, p in sorted(pipelines.items()))


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy in dict.fromkeys(p["strategy"] for p in document["rates"]):
        points = [p for p in document["rates"] if p["strategy"] == strategy]
        rates = [p["arrival_hz"] for p in points]
        left.plot(rates, [100 * p["attainment"] for p in points], marker="o", label=strategy)
        right.plot(rates, [p["accuracy_measured"] for p in points], marker="o", label=strategy)
    left.axhline(100 * document["attainment_target"], color="grey", linestyle=":")
    left.set(xlabel="arrival rate (frames/s)", ylabel=f"frames within the {document['slo_s'] * 1e3:.0f} ms SLO (%)",
             title="SLO attainment")
    if document["accuracy_floor_measured"]:
        right.axhline(document["accuracy_floor_measured"], color="grey", linestyle=":", label="accuracy floor")
    right.set(xlabel="arrival rate (frames/s)", ylabel="measured accuracy (labelled frames)", title="Accuracy")
    right.legend()
    speeds = "/".join(f"{k:g}x" for k in document["nodes"].values())
    fig.suptitle(f"edgeprune bench replicas: {len(document['nodes'])} emulated nodes ({speeds} this host)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
