"""The headline experiment: pruning policies on an emulated heterogeneous pipeline under camera-trap bursts.

For each policy the benchmark starts a fresh cluster (mosquitto, the gateway, one node agent per
scenario node and a labelled camera, as real subprocesses through :class:`edgeprune.demo.Demo`), replays
the same arrivals, seed and slowdown schedule, and reads the gateway's SQLite log afterwards.

Slow devices are *emulated*, the same for every policy: a device model (this host's compute time of every block
range at every ratio, :mod:`edgeprune.bench.devices`) is measured once per invocation, and a node with ``slowdown``
k (device speed × transient slowdown) makes each stage take k × the model's time at the ratio it runs (it computes,
then sleeps the rest), so pruning pays as on a slower CPU while eight emulated nodes share two cores without burning
them. Each figure is the median over ``--repeats`` runs with its min-max. Scenario files are documented in
``edgeprune/scenarios/README.md``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgeprune.bench.devices import TOLERANCE as DEVICES_TOLERANCE
from edgeprune.bench.devices import (
    describe_check,
    devices_check,
    measure_device_model,
    served_stage_times,
)
from edgeprune.demo import Demo, DemoOptions, SlowdownEpisode
from gateway.accuracy_model import load_block_accuracy
from gateway.curves import SliceLatencyFit, accuracy_for_slices
from gateway.policy import TOLERANCE, RatioProblem, choose_bottleneck, evaluate_ratios
from gateway.store import Reader
from shared.device_model import DeviceModel, DeviceModelError, load_device_model
from shared.settings import ControllerSettings

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
POLICIES = ("none", "static", "paper", "bottleneck", "adaptive", "adaptive+move", "replace", "replace+prune", "oracle")
# per policy: [controller] settings over the scenario's, other gateway settings, and every node's settings (env names
# without the EDGEPRUNE_<SECTION>_ prefix); a policy not listed runs the scenario's settings as they are
HOLD = {"max_ratio": 0.0}  # the trigger still runs (and logs), but may not prune: holds do
POLICY_CONTROLLER: dict[str, dict] = {"none": HOLD, "static": HOLD, "replace": HOLD, "oracle": HOLD,
                                      "paper": {"policy": "paper"}, "bottleneck": {"policy": "bottleneck"},
                                      "adaptive": {"policy": "adaptive"}, "adaptive+move": {"policy": "adaptive"}}
MOVE = {"replace_on_violation": "true"}
POLICY_GATEWAY: dict[str, dict] = {"replace": MOVE, "replace+prune": MOVE, "adaptive+move": MOVE}
# adaptive is the controller issue's parts 1-3 as shipped by default, the deadline-ordered queue included;
# adaptive+move adds part 4, re-partitioning ([gateway] replace_on_violation = true); every other policy serves in
# arrival order, as the paper's pipeline (and this one before) did
POLICY_NODE: dict[str, dict] = {p: {"deadline_order": "false"} for p in POLICIES if not p.startswith("adaptive")}
QUICK_POLICIES = ("none", "adaptive")  # --quick's default: the baseline and ours as shipped, in ~2 minutes
RESTORE_TARGET_S = 30.0
REPRUNE_HORIZON_S = 60.0
EDGE_GUARD_S = 1.0  # hops this close to a slowdown's start or end are left out of the devices check


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    duration_s: float
    slo_s: float
    window_s: float
    seed: int
    nodes: dict[str, float]  # node id -> device speed (× this host's compute)
    imbalance: dict[str, float]  # node id -> true speed over the speed its profile was measured at
    slowdowns: tuple[SlowdownEpisode, ...]
    arrivals: dict
    controller: dict = field(default_factory=dict)


def load_scenario(name_or_path: str, quick: bool = False) -> Scenario:
    """A shipped scenario by name, or a TOML file by path; ``quick`` applies its ``[quick]`` overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIOS / f"{name_or_path}.toml"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.toml")))
        raise SystemExit(f"no scenario {name_or_path!r} (shipped: {shipped}; or pass a .toml path)")
    data = tomllib.loads(path.read_text())
    if quick:
        data.update(data.pop("quick", {}))
    data.pop("quick", None)
    try:
        nodes = {n["id"]: float(n.get("speed", 1.0)) for n in data["nodes"]}
        episodes = tuple(SlowdownEpisode(s["node"], float(s["factor"]), float(s["start_s"]), float(s["end_s"]))
                         for s in data.get("slowdowns", []))
        scenario = Scenario(
            name=data.get("name", path.stem), description=data.get("description", ""),
            duration_s=float(data["duration_s"]), slo_s=float(data["slo_s"]),
            window_s=float(data.get("window_s", 5.0)), seed=int(data.get("seed", 0)), nodes=nodes,
            imbalance={k: float(v) for k, v in data.get("imbalance", {}).items()}, slowdowns=episodes,
            arrivals=dict(data.get("arrivals", {"kind": "poisson", "rate_hz": 4.0})),
            controller=dict(data.get("controller", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise SystemExit(f"scenario {path}: {type(exc).__name__}: {exc} (see edgeprune/scenarios/README.md)")
    unknown = {e.node_id for e in episodes} | set(scenario.imbalance) - set(nodes)
    if unknown - set(nodes):
        raise SystemExit(f"scenario {path}: slowdowns or imbalance name unknown nodes {sorted(unknown - set(nodes))}")
    return scenario


def camera_args(scenario: Scenario) -> tuple[str, ...]:
    a = scenario.arrivals
    kind = a.get("kind", "bursts")
    args = ["--camera-id", a.get("camera_id", "cam"), "--labelled", "--duration", str(scenario.duration_s)]
    if kind == "bursts":
        args += ["--arrival", "bursts", "--cameras", str(a.get("cameras", 1)),
                 "--time-scale", str(a.get("time_scale", 1.0))]
    elif kind == "replay":
        args += ["--trace-csv", str(a["trace_csv"]), "--time-column", a.get("time_column", "datetime"),
                 "--time-scale", str(a.get("time_scale", 1.0))]
        args += ["--camera-column", a["camera_column"]] if a.get("camera_column") else []
        args += ["--time-format", a["time_format"]] if a.get("time_format") else []
    else:
        args += ["--arrival", kind, "--rate", str(a["rate_hz"]), "--count",
                 str(int(a["rate_hz"] * scenario.duration_s))]
    return tuple(args)


def _env(section: str, settings: dict) -> dict[str, str]:
    return {f"EDGEPRUNE_{section}_{k.upper()}": str(v) for k, v in settings.items()}


def controller_env(scenario: Scenario, policy: str) -> dict[str, str]:
    """The gateway's environment for ``policy``: the scenario's [controller] with the policy's own over it."""
    return {**_env("CONTROLLER", {**scenario.controller, **POLICY_CONTROLLER.get(policy, {})}),
            **_env("GATEWAY", POLICY_GATEWAY.get(policy, {}))}


def node_env(scenario: Scenario, policy: str, device_model: Path | None) -> dict[str, dict[str, str]]:
    """Each node's environment: its device speed, the benchmark's device model, the policy's node settings."""
    shared = {**({"device_model": device_model} if device_model else {}), **POLICY_NODE.get(policy, {})}
    return {n: _env("NODE", {"emulated_slowdown": speed, **shared}) for n, speed in scenario.nodes.items()}


class PolicyRun(Demo):
    """One policy on a fresh cluster; the imbalance and the static holds are sent before the camera starts."""

    def __init__(self, scenario: Scenario, policy: str, run_dir: Path, device_model: Path | None = None):
        env = {"EDGEPRUNE_GATEWAY_WINDOW_S": str(scenario.window_s), "EDGEPRUNE_GATEWAY_STARTUP_WAIT_S": "60",
               "EDGEPRUNE_NODE_STATS_INTERVAL_S": "1", **controller_env(scenario, policy)}
        super().__init__(DemoOptions(
            run_dir=run_dir, nodes=len(scenario.nodes), duration_s=scenario.duration_s, slo_s=scenario.slo_s,
            seed=scenario.seed, slowdowns=scenario.slowdowns, env=env, web=False,
            node_ids=tuple(scenario.nodes), camera_args=camera_args(scenario), quiet=True,
            node_env=node_env(scenario, policy, device_model)))
        self.scenario = scenario
        self.policy = policy
        self.sent: dict[str, float] = {}  # request id -> capture time of every frame the camera sent
        self.plan: list[dict] = []  # the oracle's steps, published with the slowdown schedule

    def _count_frame(self, topic: str, payload: bytes, props: dict[str, str]) -> None:
        """Also the frame's capture time: a frame no stage accepted still counts where it was captured."""
        super()._count_frame(topic, payload, props)
        try:
            self.sent[props["request_id"]] = float(props["capture_ts"])
        except (KeyError, ValueError):
            pass

    def command(self, node_id: str, payload: dict) -> None:
        """A one-shot command to a node (or the gateway), over the demo's own operator connection."""
        topic = (self.topics.node_command(node_id) if node_id != "gateway"
                 else self.topics.component_command("gateway"))
        self.bus.publish(topic, json.dumps(payload), qos=1).wait_for_publish(5)

    def prepare(self, timeout_s: float = 240.0) -> None:
        """Imbalanced nodes get their true speed (they re-calibrate: the placement was planned on their
        profiled speed, so their stage is slower than planned); then wait for the controller to run."""
        asked = time.time()
        for node_id, factor in self.scenario.imbalance.items():
            self.command(node_id, {"cmd": "device_speed", "factor": self.scenario.nodes[node_id] * factor})
        deadline = time.monotonic() + timeout_s
        retried_errors = 0
        while time.monotonic() < deadline:
            self._check_alive()
            reader = Reader(self.db)
            status = reader.controller_status() or {}
            if status.get("enabled") and set(self.scenario.imbalance) <= reader.calibrated_nodes(since_ts=asked):
                break
            # on a loaded host a calibration run can be preempted into a curve that cannot be fitted: the
            # gateway rejects it (bad_calibration) and the node must measure again
            for row in reader.errors_of_kind("bad_calibration", after_id=retried_errors):
                retried_errors = max(retried_errors, row["id"])
                node_id = row["topic"].split("/")[-2]
                if node_id in self.scenario.nodes:
                    self.command(node_id, {"cmd": "calibrate"})
            time.sleep(0.5)
        else:
            raise SystemExit(f"the controller did not start within {timeout_s:.0f} s; see {self.run_dir}/*.log")

    def _wait_for_nodes(self, timeout_s: float = 600.0) -> None:
        """Every *placed* node, replicas included, has taken its stage (a scenario may offer more nodes than the
        model has blocks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                reader = Reader(self.db)
                placement = reader.placement()
                staged = {n["node_id"] for n in reader.nodes() if n.get("stage")}
            except FileNotFoundError:  # the gateway is still creating its database
                placement, staged = None, set()
            if placement and {n for s in placement["stages"] for n in [s["node_id"], *s.get("replicas", [])]} <= staged:
                return
            time.sleep(0.3)
        raise SystemExit(f"nodes did not take their stages within {timeout_s:.0f} s; see {self.run_dir}/*.log")

    def wait_for_camera(self, timeout_s: float = 120.0) -> None:
        """The schedule's clock starts when the camera is connected: its arrivals count from that moment (it
        loads the labelled frames first, which takes seconds on a loaded machine)."""
        deadline = time.monotonic() + timeout_s
        while "connected to" not in (self.run_dir / "camera.log").read_text():
            if time.monotonic() > deadline:
                raise SystemExit(f"the camera did not connect within {timeout_s:.0f} s; see {self.run_dir}/camera.log")
            self._check_alive()
            time.sleep(0.05)

    def hold(self, ratio: float) -> None:
        """Static pruning: the operator's manual hold at ``ratio`` on every placed node, for the whole run."""
        self.hold_each({s["node_id"]: ratio for s in Reader(self.db).placement()["stages"]})

    def hold_each(self, ratios: dict[str, float]) -> None:
        """Operator holds through the gateway, which publishes them and records them as prune events."""
        for node_id, ratio in ratios.items():
            self.command("gateway", {"cmd": "prune", "node_id": node_id, "ratio": ratio, "by": self.policy})

    def _apply_episodes(self, elapsed: float, applied: set) -> None:
        """The slowdown schedule, then in the same tick the oracle's ratios for it (as operator holds)."""
        super()._apply_episodes(elapsed, applied)
        for index, step in enumerate(self.plan):
            if step["at_s"] <= elapsed and ("oracle", index) not in applied:
                applied.add(("oracle", index))
                self.hold_each(step["changed"])

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time of the pipeline's components so far (user + system, from /proc; the camera, which may have
        exited, is not part of the pipeline): emulated sleeps cost none."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, proc in [(n, p) for n, p in self.site.procs.items() if n != "camera"]:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError):
                pass
        return out


def ratio_problem(reader: Reader, scenario: Scenario, settings: ControllerSettings) -> tuple[RatioProblem, list[str]]:
    """The controller's problem for the placed stages as the gateway sees them (latest calibrations, the
    calibrated accuracy of their slices, the scenario's stage budget and floor), at slowdown 1, with the
    placed node ids in stage order."""
    stages = reader.placement()["stages"]
    fits = {node_id: SliceLatencyFit.from_dict(fit) for node_id, fit in reader.calibration_fits().items()}
    block_accuracy = load_block_accuracy(None, _fingerprint())
    accuracy = accuracy_for_slices(block_accuracy, [(s["first_block"], s["last_block"]) for s in stages])
    unpruned = accuracy.predictor(settings.accuracy_model)([0.0] * len(stages))
    nodes = [s["node_id"] for s in stages]
    problem = RatioProblem(latency=[fits[n] for n in nodes], slowdowns=[1.0] * len(nodes), accuracy=accuracy,
                           accuracy_floor=settings.accuracy_floor_relative * unpruned,
                           budget_s=settings.budget_fraction * scenario.slo_s / len(nodes),
                           ladder=[r for r in settings.ladder if r <= settings.max_ratio + TOLERANCE],
                           accuracy_model=settings.accuracy_model, names=nodes)
    return problem, nodes


def static_ratio(reader: Reader, scenario: Scenario, settings: ControllerSettings) -> dict:
    """Offline choice of the best single uniform ratio: the least pruning whose predicted bottleneck at the
    scenario's worst slowdowns meets the stage budget, within the accuracy floor (else the most the floor allows)."""
    base, nodes = ratio_problem(reader, scenario, settings)
    worst = {n: max([1.0] + [e.factor for e in scenario.slowdowns if e.node_id == n]) for n in nodes}
    problem = replace(base, slowdowns=[worst[n] for n in nodes])
    budget = problem.budget_s
    allowed = [r for r in problem.ladder if problem.meets_floor([r] * len(nodes))]
    chosen = next((r for r in allowed
                   if evaluate_ratios(problem, [r] * len(nodes), "static", "").bottleneck_s <= budget), allowed[-1])
    return {"ratio": chosen, "budget_s": budget, "worst_slowdowns": worst,
            "predicted_accuracy": problem.predict_accuracy([chosen] * len(nodes))}


def true_slowdowns(episodes: tuple[SlowdownEpisode, ...], at_s: float) -> dict[str, float]:
    """Each node's transient slowdown at ``at_s`` (seconds since the camera started) as the benchmark applies the
    schedule: an episode's start sets its factor, its end sets 1; the latest edge at or before ``at_s`` wins."""
    edges = sorted([(e.start_s, 1, e.node_id, e.factor) for e in episodes]
                   + [(e.end_s, 0, e.node_id, 1.0) for e in episodes])  # at equal times an end precedes a start
    factors: dict[str, float] = {}
    for at, _, node, factor in edges:
        if at <= at_s:
            factors[node] = factor
    return factors


def oracle_plan(problem: RatioProblem, nodes: list[str], episodes: tuple[SlowdownEpisode, ...]) -> list[dict]:
    """The oracle's ratios over the run: at the start and at every slowdown's onset and end, what the controller's
    solver (:func:`choose_bottleneck`: least accuracy loss that meets the stage budget, never below the floor;
    its best effort, flagged infeasible, when the budget cannot be met) picks for the *true* slowdowns then.
    A step is listed only where some ratio changes; ``problem`` holds the calibrated curves at slowdown 1."""
    steps: list[dict] = []
    current = {n: 0.0 for n in nodes}
    for at_s in sorted({0.0} | {t for e in episodes for t in (e.start_s, e.end_s)}):
        factors = true_slowdowns(episodes, at_s)
        decision = choose_bottleneck(replace(problem, slowdowns=[factors.get(n, 1.0) for n in nodes]))
        ratios = dict(zip(nodes, decision.ratios))
        changed = {n: r for n, r in ratios.items() if abs(r - current[n]) > TOLERANCE}
        if changed:
            current = ratios
            steps.append({"at_s": at_s, "ratios": ratios, "changed": changed,
                          "slowdowns": {n: factors.get(n, 1.0) for n in nodes},
                          "predicted_bottleneck_s": decision.bottleneck_s, "predicted_accuracy": decision.accuracy,
                          "infeasible": decision.infeasible, "reason": decision.reason})
    return steps


def _fingerprint() -> str:
    from shared.model import build_model, model_fingerprint

    return model_fingerprint(build_model())


class Progress:
    """One line per policy: a bar over the run's seconds."""

    def __init__(self, label: str, total_s: float):
        self.label, self.total_s = label, total_s

    def __call__(self, elapsed: float) -> None:
        done = min(1.0, elapsed / self.total_s)
        bar = "#" * int(30 * done)
        print(f"\r{self.label:>14} [{bar:<30}] {elapsed:5.0f}/{self.total_s:.0f} s", end="", file=sys.stderr,
              flush=True)


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def failure_reasons(failed: int, dropped: int, errors: dict[str, int]) -> dict[str, int]:
    """Why the ``failed`` frames failed, each frame once. A drop from a node's full work queue is both in the
    node's ``dropped`` counter and on the error topic (kind ``dropped``): it is counted once, from whichever saw
    more (the counter's last report may precede the last drops; an error message may be lost)."""
    reasons = {"dropped_full_queue": max(dropped, errors.get("dropped", 0)),
               **{f"error_{k}": v for k, v in errors.items() if k != "dropped"}}
    reasons["lost_or_unfinished"] = max(0, failed - sum(reasons.values()))
    return reasons


def percentile_all(latency: np.ndarray, failed: int, q: float) -> float | None:
    """Nearest-rank ``q``-th percentile over every frame sent, a failed frame counting as ∞ (a miss): None where
    the rank falls on a failure, i.e. more than (100 − q)% of the frames failed."""
    n = latency.size + failed
    if not n:
        return None
    rank = max(1, math.ceil(q / 100 * n))
    return float(np.sort(latency)[rank - 1]) if rank <= latency.size else None


def summarise(reader: Reader, scenario: Scenario, started_ts: float, frames_sent: int, cpu_s: dict[str, float],
              settings: ControllerSettings, sent: dict[str, float] | None = None) -> dict:
    """The issue's metrics for one policy run, from the gateway's SQLite log (and ``sent``: request id -> capture
    time of the frames the camera sent, as the broker delivered them)."""
    rows = reader.frames()
    latency = np.array([r["e2e_s"] for r in rows])
    met = int((latency <= scenario.slo_s).sum())
    frames = max(frames_sent, len(rows))
    nodes = reader.nodes()
    dropped = sum(n.get("dropped") or 0 for n in nodes)
    failed = frames - len(rows)
    reasons = failure_reasons(failed, dropped, reader.frame_errors_by_kind())
    # a failed frame's capture time: as the camera sent it, else as stage 1 announced it on pipeline/accepted
    captured = reader.accepted_capture_times()
    captured.update(sent or {})
    served = {r["request_id"] for r in rows}
    failed_series = sorted(round(ts - started_ts, 3) for rid, ts in captured.items() if rid not in served)

    predicted = _predicted_accuracy(reader, rows, settings)
    correct = [r["correct"] for r in rows if r["correct"] is not None]
    everything = _timeline(reader.prune_history())
    onsets = sorted(started_ts + e.start_s for e in scenario.slowdowns)
    ends = sorted(started_ts + e.end_s for e in scenario.slowdowns)
    timeline = [event for event in everything if event[0] >= started_ts]  # static holds precede the camera
    acted = [t for t, kind, _ in timeline if kind in ("prune", "replace")]
    after_onset = [t for t in acted if onsets and t >= onsets[0]]
    reaction = after_onset[0] - onsets[0] if after_onset else None
    restore = _full_restore(timeline, ends[-1]) if ends and acted else None
    reprunes = count_reprunes(timeline, onsets)
    span = (rows[-1]["finish_ts"] - rows[0]["capture_ts"]) if len(rows) > 1 else None
    return {
        "frames": frames, "results": len(rows), "met": met, "attainment": met / frames if frames else None,
        "p50_all_s": percentile_all(latency, failed, 50), "p95_all_s": percentile_all(latency, failed, 95),
        "p99_all_s": percentile_all(latency, failed, 99),
        "p50_s": _percentile(latency, 50), "p95_s": _percentile(latency, 95), "p99_s": _percentile(latency, 99),
        "throughput_fps": len(rows) / span if span else None, "failed": failed, "failed_reasons": reasons,
        "failed_capture_unknown": failed - len(failed_series), "late": reader.accounting()["late"],
        "accuracy_predicted_mean": float(np.mean(predicted)) if predicted else None,
        "accuracy_predicted_worst": float(np.min(predicted)) if predicted else None,
        "accuracy_measured": float(np.mean(correct)) if correct else None,
        "labelled": len(correct),
        "prune_events": sum(1 for _, kind, _ in timeline if kind == "prune"),
        "restore_events": sum(1 for _, kind, _ in timeline if kind == "restore"),
        "replacement_events": sum(1 for _, kind, _ in timeline if kind == "replace"),
        "reaction_s": reaction, "full_restore_s": restore[0] if restore else None,
        "restored_within_run": restore is not None if acted and ends else None,
        "reprunes_after_restore": reprunes, "hop_breakdown": hop_breakdown(rows) if rows else {},
        "cpu_s_per_frame": sum(cpu_s.values()) / len(rows) if rows else None,
        "cpu_s_by_component": cpu_s,
        "served_stage_times": served_stage_times(_served_hops(reader, rows, scenario, started_ts)),
        "latency_series": [[round(r["capture_ts"] - started_ts, 3), round(r["e2e_s"], 4)] for r in rows],
        "failed_series": failed_series,
        "ratio_series": [[round(max(0.0, t - started_ts), 3), kind, detail] for t, kind, detail in everything],
    }


def _placed_frames(reader: Reader, rows: list[dict]) -> Iterator[tuple[int, list[tuple[dict, dict]]]]:
    """Per stored frame, the version of the placement it ran under (the latest issued before stage 1 received
    it) and its hops each with that placement's stage; frames whose hops do not match its stages are left out."""
    placements = reader.placement_history()
    for r in rows:
        hops = r["hops"]
        in_force = [p for p in placements if p["issued_at"] <= hops[0]["received_ts"]] or placements[:1]
        if not in_force:
            continue
        stages = in_force[-1]["stages"]
        if len(stages) == len(hops):
            yield in_force[-1]["version"], list(zip(hops, stages))


def _served_hops(reader: Reader, rows: list[dict], scenario: Scenario,
                 started_ts: float) -> list[tuple[str, tuple[int, int], float, float, float]]:
    """(node, blocks, ratio, transient slowdown, emulated compute) of every stored hop: what each device served."""
    out = []
    for _, staged in _placed_frames(reader, rows):
        for hop, stage in staged:
            if ran_elsewhere(hop, stage):
                continue  # a frame of a move: its device time is of other blocks
            at_s = hop["started_ts"] - started_ts
            if any(abs(at_s - t) < EDGE_GUARD_S for e in scenario.slowdowns if e.node_id == hop["node_id"]
                   for t in (e.start_s, e.end_s)):
                continue  # the slowdown command and this frame may have crossed
            slowdown = true_slowdowns(scenario.slowdowns, hop["started_ts"] - started_ts).get(hop["node_id"], 1.0)
            compute = hop["finished_ts"] - hop["started_ts"] - hop.get("decode_s", 0.0)
            out.append((hop["node_id"], (stage["first_block"], stage["last_block"]), hop["prune_ratio"], slowdown,
                        compute))
    return out


def hop_breakdown(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Where a frame's time goes, per hop (median and p99, ms): each stage's queue wait, decode of its input,
    compute (the slice, emulated sleep included) and encode (output to hop record), each transfer (camera ->
    stage 1, stage i -> i+1, last stage -> gateway: serialisation, MQTT, thread hand-offs), the end-to-end
    latency and its non-compute part (end to end minus the stages' compute). End to end here runs to the gateway's
    receipt (``received_ts``), one hop further than ``e2e_s``, so the parts add up to it. ``rows`` as
    :meth:`gateway.store.Reader.frames` reads them (hops decoded)."""
    parts: dict[str, list[float]] = {}
    for r in rows:
        hops = r["hops"]
        previous = r["capture_ts"]
        compute = 0.0
        for i, hop in enumerate(hops, start=1):
            decode = hop.get("decode_s", 0.0)
            parts.setdefault(f"transfer to stage {i}", []).append(hop["received_ts"] - previous)
            parts.setdefault(f"stage {i} queue", []).append(hop["started_ts"] - hop["received_ts"])
            parts.setdefault(f"stage {i} decode", []).append(decode)
            parts.setdefault(f"stage {i} compute", []).append(hop["finished_ts"] - hop["started_ts"] - decode)
            parts.setdefault(f"stage {i} encode", []).append(hop["published_ts"] - hop["finished_ts"])
            compute += hop["finished_ts"] - hop["started_ts"] - decode
            previous = hop["published_ts"]
        parts.setdefault("transfer to gateway", []).append(r["received_ts"] - previous)
        parts.setdefault("end to end", []).append(r["received_ts"] - r["capture_ts"])
        parts.setdefault("non-compute", []).append(r["received_ts"] - r["capture_ts"] - compute)
    return {name: {"p50_ms": 1000 * float(np.percentile(v, 50)), "p99_ms": 1000 * float(np.percentile(v, 99))}
            for name, v in parts.items()}


def _timeline(events: list[dict]) -> list[tuple[float, str, dict]]:
    """(ts, prune | restore | replace, detail) from :meth:`gateway.store.Reader.prune_history`: a `set` that raises
    any ratio is a prune."""
    out = []
    current: dict[str, float] = {}
    for e in events:
        if e["kind"] == "replace":
            out.append((e["ts"], "replace", {"reason": e["reason"]}))
            continue
        if e["kind"] != "set" or e["changed"] is None:
            continue
        changed = e["changed"]
        raised = any(r > current.get(n, 0.0) + 1e-9 for n, r in changed.items())
        current.update(changed)
        out.append((e["ts"], "prune" if raised else "restore", dict(current)))
    return out


def count_reprunes(timeline: list[tuple[float, str, dict]], onsets: list[float]) -> int:
    """Prunes within ``REPRUNE_HORIZON_S`` after a restore: the controller undoing its own restore (flapping).
    A prune for a slowdown that began after the restore is a new reaction, not a re-prune (one `paper` repeat
    counted 3: a burst pruned at 21 s and restored at 23.6 s, then the slowdown from 30 s)."""
    restores = [t for t, kind, _ in timeline if kind == "restore"]
    return sum(1 for t, kind, _ in timeline if kind == "prune" and any(
        0 < t - r <= REPRUNE_HORIZON_S and not any(r < onset <= t for onset in onsets) for r in restores))


def _full_restore(timeline: list[tuple[float, str, dict]], end_ts: float) -> tuple[float] | None:
    """Seconds from the last slowdown's end until every ratio is 0 again and the placement has moved back, the
    first time both hold (0 when they already did at the end); None if that never happens within the run. A prune
    after it is not a slower restore but a new prune: :func:`count_reprunes` counts it."""
    replaced, pruned = False, False
    for ts, kind, detail in timeline:
        if ts >= end_ts and not (replaced or pruned):
            return (0.0,)
        if kind == "replace":
            replaced = not replaced
        else:
            pruned = any(r > 1e-9 for r in detail.values())
        if ts >= end_ts and not (replaced or pruned):
            return (ts - end_ts,)
    return None if replaced or pruned else (0.0,)


def _predicted_accuracy(reader: Reader, rows: list[dict], settings: ControllerSettings) -> list[float]:
    """Calibrated accuracy of the ratios (and slices) each frame ran at."""
    block_accuracy = load_block_accuracy(None, _fingerprint())
    if block_accuracy is None:
        return []
    cache: dict = {}
    out = []
    for version, staged in _placed_frames(reader, rows):
        if any(ran_elsewhere(h, s) for h, s in staged):
            continue  # a frame of a move: it ran other slices (at full width) than the placement's
        key = (version, tuple(h["prune_ratio"] for h, _ in staged))
        if key not in cache:
            fit = accuracy_for_slices(block_accuracy, [(s["first_block"], s["last_block"]) for _, s in staged])
            cache[key] = fit.predictor(settings.accuracy_model)(list(key[1]))
        out.append(cache[key])
    return out


def ran_elsewhere(hop: dict, stage: dict) -> bool:
    """Whether ``hop`` ran other blocks than ``stage`` of the placement (a stage serving a frame during a move);
    hops of nodes that predate block records count as the stage's."""
    if hop.get("first_block") is None:
        return False
    first, last = stage["first_block"], stage["last_block"]
    return (hop["first_block"], hop["n_blocks"]) != (first, last - first + 1)


def add_arguments(parser) -> None:
    parser.add_argument("--scenario", default="paper", help="a shipped scenario (paper, hetero4, scale8) or a "
                        ".toml path")
    parser.add_argument("--policies", help=f"comma-separated subset of {', '.join(POLICIES)} (default: all of "
                        f"them; with --quick {', '.join(QUICK_POLICIES)})")
    parser.add_argument("--quick", action="store_true", help="the scenario's short [quick] variant (< 1 min a policy) "
                        f"for {' and '.join(QUICK_POLICIES)} unless --policies says otherwise: a smoke run")
    parser.add_argument("--run-dir", type=Path, default=Path("run/bench-pipeline"), help="logs and databases")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots into DIR (e.g. docs/results)")
    parser.add_argument("--saturation", action="store_true", help="instead of the policies: the highest frame "
                        "rate a 2-node pipeline at p=0 sustains, against 1 / (slowest stage), and the time per hop")
    parser.add_argument("--device-speed", type=float, default=10.0, help="--saturation: both nodes' device speed")
    parser.add_argument("--step-s", type=float, default=15.0, help="--saturation: seconds of traffic per rate")
    parser.add_argument("--rates", metavar="X,Y,..", help="attainment against arrival rate: run the policies at "
                        "each of these multiples of the scenario's arrival rate (e.g. 0.5,1,2; 1 is always included "
                        "and fills the main table), same seed and slowdown schedule; adds `rate_sweep` to the JSON "
                        "and a <scenario>-rates.png plot")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON", help="run nothing: re-derive the table "
                        "and plots from a JSON this benchmark wrote; several (the same scenario on the same device "
                        "model, e.g. one invocation per policy run side by side) are merged into one comparison, "
                        "their devices checked against each other")
    parser.add_argument("--repeats", type=int, metavar="N", help="runs per policy (and rate), each on a fresh "
                        "cluster; every figure is the median with its min-max (default 3, 1 with --quick)")
    parser.add_argument("--device-model", type=Path, metavar="PATH", help="the emulated device every node runs "
                        "on, from a device-model.json an earlier run wrote (default: measure it now, once)")
    parser.add_argument("--device-repeats", type=int, metavar="N", help="timed runs per block range and ratio "
                        "when measuring the device model (default 15, 3 with --quick)")
    parser.add_argument("--devices-tolerance", type=float, default=DEVICES_TOLERANCE, metavar="FRACTION",
                        help=f"how far apart two runs' served stage times may be before the run fails as 'different "
                        f"devices' (default {DEVICES_TOLERANCE:g}); only to smoke-test the benchmark on a busy host, "
                        "where a stage's real compute can outgrow the model's time: its figures carry no claim")


def in_slowdowns(result: dict, document: dict) -> None:
    """A run's figures over the frames *captured* while any slowdown was on, failed frames included (their capture
    times are in ``failed_series``; a run recorded before it has none, so its slowed figures are None), and how fast
    the policy acted once a frame saw the slowdown (bursts may leave a slowed node idle for a while)."""
    windows = [(e["start_s"], e["end_s"]) for e in document["slowdowns"]]
    onset = min((a for a, _ in windows), default=None)
    failed_at = result.get("failed_series")
    captured = [t for t, _ in result["latency_series"]] + (failed_at or [])
    first = min((t for t in captured if onset is not None and t >= onset), default=None)
    acted = [t for t, kind, _ in result["ratio_series"] if kind in ("prune", "replace")
             and first is not None and t >= first]
    result["first_slowed_frame_s"] = first
    result["reaction_frame_s"] = acted[0] - first if acted else None
    inside = lambda t: any(a <= t < b for a, b in windows)  # noqa: E731
    latency = np.array([lat for t, lat in result["latency_series"] if inside(t)])
    lost = sum(1 for t in failed_at or [] if inside(t))
    result["slowed_frames"] = int(latency.size) + lost if failed_at is not None else None
    result["slowed_failed"] = lost if failed_at is not None else None
    result["slowed_attainment"] = (float((latency <= document["slo_s"]).sum()) / result["slowed_frames"]
                                   if result["slowed_frames"] else None)
    result["slowed_p95_all_s"] = percentile_all(latency, lost, 95) if failed_at is not None else None


def aggregate(runs: list[dict]) -> dict:
    """One policy's figures over its repeats: every numeric figure of the runs as ``{median, min, max}`` (a null,
    e.g. a p95 past the failures or a reaction that never came, counts as ∞ and is null again if it lands there),
    or as the plain number when there is one run; ``runs`` keeps every repeat's full summary and ``median_run``
    the index of the run with the median attainment (the one the plots draw)."""
    keys = [k for k, v in runs[0].items() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))]
    out: dict = {}
    for key in keys:
        values = [r.get(key) for r in runs]
        if len(runs) == 1 or all(v is None for v in values):
            out[key] = values[0]
            continue
        ordered = np.array([math.inf if v is None else float(v) for v in values])
        back = lambda x: None if math.isinf(x) else float(x)  # noqa: E731
        out[key] = {"median": back(float(np.median(ordered))), "min": back(ordered.min()), "max": back(ordered.max())}
    attained = [r.get("attainment") or 0.0 for r in runs]
    out["median_run"] = int(np.argsort(attained)[(len(runs) - 1) // 2])
    out["runs"] = runs
    return out


def median(x) -> float | None:
    """A figure's median: itself for one repeat."""
    return x.get("median") if isinstance(x, dict) else x


def span(x) -> tuple[float, float]:
    """A figure's [min, max] over repeats (a null is ∞)."""
    low, high = (x["min"], x["max"]) if isinstance(x, dict) else (x, x)
    return (math.inf if low is None else low), (math.inf if high is None else high)


def differs(a, b) -> bool:
    """Whether two policies' figures differ: only where their min-max ranges over repeats do not overlap (with
    one repeat each, the ranges are points: any two unequal figures differ, so claims need repeats)."""
    (a_low, a_high), (b_low, b_high) = span(a), span(b)
    return a_high < b_low or b_high < a_low


def cell(x, scale: float = 1.0, null: str = "") -> str | None:
    """``median [min–max]`` (one repeat: the number), scaled; a null shown as ``null`` (∞ for latencies)."""
    def one(v):
        return null if v is None else f"{scale * v:.4g}"
    if isinstance(x, dict):
        return f"{one(x['median'])} [{one(x['min'])}–{one(x['max'])}]"
    return None if x is None and not null else one(x)


def table(document: dict) -> list[dict]:
    none = document["policies"].get("none")
    return [{"policy": p, "frames": cell(r["frames"]), "attain_%": cell(r["attainment"], 100),
             "≠none": ("" if none is None or p == "none" else
                       "yes" if differs(r["attainment"], none["attainment"]) else "no"),
             "slowed_%": cell(r.get("slowed_attainment"), 100),
             "p50_all_ms": _all_frames(r, "p50_all_s"), "p95_all_ms": _all_frames(r, "p95_all_s"),
             "p99_all_ms": _all_frames(r, "p99_all_s"), "p95_res_ms": cell(r["p95_s"], 1000),
             "fps": cell(r["throughput_fps"]), "failed": cell(r["failed"]),
             "acc_pred": cell(r["accuracy_predicted_mean"]), "acc_pred_min": cell(r["accuracy_predicted_worst"]),
             "acc_meas": cell(r["accuracy_measured"]), "prunes": cell(r["prune_events"]),
             "replaces": cell(r["replacement_events"]), "react_s": cell(r["reaction_s"]),
             "react_frame_s": cell(r.get("reaction_frame_s")), "restore_s": cell(r["full_restore_s"]),
             "reprunes": cell(r["reprunes_after_restore"]), "late": cell(r.get("late")),
             "cpu_ms/frame": cell(r["cpu_s_per_frame"], 1000), "load_1m": _mean_load(r)}
            for p, r in document["policies"].items()]


def _all_frames(result: dict, key: str) -> str | None:
    """A latency over every frame sent, in ms (∞ past the failures; blank in JSON written before it existed)."""
    return cell(result[key], 1000, "∞") if key in result else None


def _mean_load(result: dict) -> float | None:
    """The host's mean 1-minute load average during a policy's runs, the highest over its repeats (a sweep row
    holds it already; absent from JSON written before it was recorded)."""
    loads = [r.get("host_load_1m") for r in result.get("runs", [result])]
    loads = [x.get("mean") if isinstance(x, dict) else x for x in loads]
    return max((x for x in loads if x is not None), default=None)


def saturation(args) -> dict:
    """Fixed-rate traffic at rising rates through a 2-node pipeline at p=0 (no controller action).

    A rate counts as sustained when every frame came back and the last quarter's median latency stays within
    2x (+50 ms) of the first quarter's: the queue does not grow. The physical limit is 1 / the slowest stage's
    median decode + compute, measured at a low rate in the same run.
    """
    scenario = Scenario(name="saturation", description="2 nodes at p=0, fixed-rate frames at rising rates",
                        duration_s=args.step_s, slo_s=10.0, window_s=5.0, seed=0,
                        nodes={"node-1": args.device_speed, "node-2": args.device_speed}, imbalance={},
                        slowdowns=(), arrivals={}, controller={"max_ratio": 0.0})
    bench = PolicyRun(scenario, "none", args.run_dir / "saturation")
    steps: list[dict] = []
    try:
        bench.start_pipeline()
        bench.prepare()
        low = _saturation_step(bench, 0, 2.0, args.step_s)
        low_hops = low.pop("hops")
        stage_compute = {k: v["p50_ms"] + low_hops[k.replace("compute", "decode")]["p50_ms"]  # busy per frame
                         for k, v in low_hops.items() if k.endswith("compute")}
        limit_fps = 1000.0 / max(stage_compute.values())
        steps.append(low)
        for k, fraction in enumerate((0.5, 0.7, 0.85, 0.95, 1.05, 1.2), start=1):
            print(f"\rsaturation: {fraction:.0%} of the limit ({fraction * limit_fps:.1f} frames/s)", end="",
                  file=sys.stderr, flush=True)
            step = _saturation_step(bench, k, fraction * limit_fps, args.step_s)
            step.pop("hops")
            steps.append(step)
    finally:
        bench.stop_processes()
    print(file=sys.stderr)
    sustained = [s["rate_fps"] for s in steps if s["sustained"]]
    best = max(sustained, default=None)
    document = {"saturation": {"device_speed": args.device_speed, "stage_compute_p50_ms": stage_compute,
                               "limit_fps": limit_fps, "highest_sustained_fps": best,
                               "fraction_of_limit": best / limit_fps if best else None, "steps": steps,
                               "hop_breakdown_at_2fps": low_hops}}
    document["tables"] = {"saturation: 2 nodes, p = 0": steps,
                          "time per hop at 2 frames/s (ms)": [{"part": k, **v} for k, v in low_hops.items()]}
    return document


def _saturation_step(bench: PolicyRun, index: int, rate: float, step_s: float) -> dict:
    camera = f"sat{index}"
    bench.opt.camera_args = ("--camera-id", camera, "--arrival", "fixed", "--rate", f"{rate:.3f}",
                             "--count", str(max(5, int(rate * step_s))))
    bench.start_camera()
    sent = max(5, int(rate * step_s))
    bench.site.procs["camera"].wait(timeout=step_s * 4 + 120)
    time.sleep(3.0)  # the queue drains
    rows = Reader(bench.db).frames(camera)
    latency = np.array([r["e2e_s"] for r in rows])
    quarter = max(1, latency.size // 4)
    stable = latency.size > 0 and (np.median(latency[-quarter:]) <= 2 * np.median(latency[:quarter]) + 0.05)
    hops = hop_breakdown(rows) if rows else {}
    span = rows[-1]["finish_ts"] - rows[0]["capture_ts"] if len(rows) > 1 else None
    return {"rate_fps": rate, "sent": sent, "results": len(rows), "throughput_fps": len(rows) / span if span else None,
            "p50_ms": _ms(_percentile(latency, 50)), "p95_ms": _ms(_percentile(latency, 95)),
            "sustained": bool(stable and len(rows) >= sent), "hops": hops}


def run_policy(scenario: Scenario, policy: str, run_dir: Path, settings: ControllerSettings,
               label: str | None = None, device_model: Path | None = None) -> tuple[dict, dict]:
    """One policy on a fresh cluster: its summary, and what it chose offline (``static``'s ratio, the
    ``oracle``'s plan) for the document."""
    bench = PolicyRun(scenario, policy, run_dir, device_model)
    chosen: dict = {}
    try:
        bench.start_pipeline()
        bench.prepare()
        if policy == "static":
            chosen["static_choice"] = static_ratio(Reader(bench.db), scenario, settings)
            bench.hold(chosen["static_choice"]["ratio"])
        if policy == "oracle":
            plan = oracle_plan(*ratio_problem(Reader(bench.db), scenario, settings), scenario.slowdowns)
            chosen["oracle_plan"] = plan
            for step in [s for s in plan if s["at_s"] <= 0]:  # pruned from the start: before the camera
                bench.hold_each(step["changed"])
            bench.plan = [s for s in plan if s["at_s"] > 0]
        cpu_before = bench.cpu_seconds()
        bench.start_camera()
        bench.wait_for_camera()
        started_ts = time.time()
        progress = Progress(label or policy, scenario.duration_s)
        cpu_after: dict[str, float] = {}
        loads: list[float] = []

        def each_second(elapsed: float) -> None:
            progress(elapsed)
            cpu_after.update(bench.cpu_seconds())  # the last reading before run() stops everything
            loads.append(os.getloadavg()[0])  # how shared the host was: the figures vary with it

        bench.run(on_second=each_second)
        cpu_s = {n: cpu_after[n] - cpu_before.get(n, 0.0) for n in cpu_after}
    finally:
        bench.stop_processes()
    print(file=sys.stderr)
    summary = bench.summary()
    result = summarise(Reader(bench.db), scenario, started_ts, summary["frames_sent"] or 0, cpu_s, settings,
                       bench.sent)
    result["host_load_1m"] = {"mean": float(np.mean(loads)), "max": max(loads)} if loads else None
    return result, chosen


def at_rate(scenario: Scenario, multiplier: float) -> Scenario:
    """The same scenario with its arrivals ``multiplier`` × as frequent: a burst or replayed trace is compressed
    that much more in time (``time_scale`` × multiplier: the same sequences, seed and slowdown schedule), a
    Poisson or fixed rate is multiplied."""
    arrivals = dict(scenario.arrivals)
    if arrivals.get("kind", "bursts") in ("bursts", "replay"):
        arrivals["time_scale"] = float(arrivals.get("time_scale", 1.0)) * multiplier
    else:
        arrivals["rate_hz"] = float(arrivals["rate_hz"]) * multiplier
    return replace(scenario, arrivals=arrivals)


def parse_rates(text: str) -> list[float]:
    """``--rates 0.5,1,2``: multipliers of the scenario's arrival rate, ascending; 1 (the scenario's own rate,
    whose runs fill the document's ``policies``) is always among them."""
    try:
        rates = {float(r) for r in text.split(",") if r.strip()}
    except ValueError:
        raise SystemExit(f"--rates {text!r}: expected comma-separated multipliers, e.g. 0.5,1,2") from None
    if any(r <= 0 or not math.isfinite(r) for r in rates):
        raise SystemExit(f"--rates {text!r}: multipliers must be positive")
    return sorted(rates | {1.0})


def sweep_row(multiplier: float, policy: str, result: dict, duration_s: float) -> dict:
    """One point of attainment against arrival rate (figures over repeats as in :func:`aggregate`): the offered
    rate is frames sent over the run's seconds."""
    row = {"rate_multiplier": multiplier, "arrival_hz": median(result["frames"]) / duration_s, "policy": policy}
    for key in ("frames", "failed", "attainment", "accuracy_measured", "accuracy_predicted_mean", "p50_all_s",
                "p95_all_s", "p50_s", "p95_s", "prune_events"):
        row[key] = result.get(key)
    row["host_load_1m"] = _mean_load(result)
    return row


def against_none(sweep: list[dict]) -> list[dict]:
    """Per rate, each policy against ``none`` at that rate: attainment ratio, p50 ratio over every frame (a null
    p50, more than half the frames failed, is ∞), measured accuracy, and whether the attainment ranges differ."""
    baseline = {r["rate_multiplier"]: r for r in sweep if r["policy"] == "none"}
    out = []
    for r in sweep:
        base = baseline.get(r["rate_multiplier"])
        if base is None or r["policy"] == "none":
            continue
        attain, base_attain = median(r["attainment"]), median(base["attainment"])
        p50, base_p50 = median(r.get("p50_all_s")), median(base.get("p50_all_s"))  # None: JSON before it
        out.append({"rate_x": r["rate_multiplier"], "arrival_hz": r["arrival_hz"], "policy": r["policy"],
                    "attain_vs_none": attain / base_attain if attain is not None and base_attain else None,
                    "attainment_differs": differs(r["attainment"], base["attainment"]),
                    "p50_all_vs_none": (p50 / base_p50 if p50 is not None and base_p50 is not None
                                        else 0.0 if p50 is not None else None),
                    "accuracy_measured": median(r["accuracy_measured"]),
                    "none_accuracy_measured": median(base["accuracy_measured"])})
    return out


def device_model_for(args, scenario: Scenario) -> tuple[Path, DeviceModel]:
    """The invocation's one device model: ``--device-model PATH``, or measured now (before any policy runs); either
    way saved into the run directory, where every node reads it (by its absolute path: nodes run in their own)."""
    path = (args.run_dir / scenario.name / "device-model.json").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.device_model:
        try:
            model = load_device_model(args.device_model, _fingerprint())
        except DeviceModelError as exc:
            raise SystemExit(str(exc)) from None
    else:
        model = measure_device_model(args.device_repeats or (3 if args.quick else 15))
    model.save(path)
    return path, model


def run(args) -> dict:
    if args.saturation:
        return saturation(args)
    if args.replot:
        return checked(finished(merged([json.loads(path.read_text()) for path in args.replot]), args.plots))
    scenario = load_scenario(args.scenario, args.quick)
    chosen_policies = args.policies or ",".join(QUICK_POLICIES if args.quick else POLICIES)
    policies = [p.strip() for p in chosen_policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    rates = parse_rates(args.rates) if args.rates else [1.0]
    repeats = args.repeats or (1 if args.quick else 3)
    settings = ControllerSettings(**scenario.controller)
    load_at_start = os.getloadavg()[0]
    model_path, device_model = device_model_for(args, scenario)
    results: dict[str, dict] = {}
    chosen: dict = {"static_choice": None}
    sweep: list[dict] = []
    for multiplier in rates:
        scaled = at_rate(scenario, multiplier)
        for policy in policies:
            runs = []
            for repeat in range(repeats):
                run_dir = args.run_dir / scenario.name
                run_dir = run_dir / f"rate-x{multiplier:g}" if args.rates else run_dir
                run_dir = run_dir / (policy.replace("+", "-") + (f"-{repeat + 1}" if repeats > 1 else ""))
                label = policy + (f" x{multiplier:g}" if args.rates else "") + (f" #{repeat + 1}" if repeats > 1
                                                                                else "")
                result, offline = run_policy(scaled, policy, run_dir, settings, label, model_path)
                runs.append(result)
                if multiplier == 1.0:
                    chosen.update(offline)
            key = policy if multiplier == 1.0 else f"{policy} x{multiplier:g}"
            results[key] = aggregate(runs)
    # every run's served stage times, at every rate: the same device throughout, or no comparison at all
    check = devices_check({f"{p}#{i + 1}": r["served_stage_times"] for p, result in results.items()
                           for i, r in enumerate(result["runs"])}, args.devices_tolerance)
    for multiplier in rates:
        for policy in policies:
            key = policy if multiplier == 1.0 else f"{policy} x{multiplier:g}"
            sweep.append(sweep_row(multiplier, policy, results[key], scenario.duration_s))
    document = {
        "scenario": scenario.name, "quick": args.quick, "description": scenario.description, "repeats": repeats,
        "figures": "each figure of policies.<name> is {median, min, max} over the repeats when repeats > 1, the "
                   "plain number for one repeat; policies.<name>.runs holds every repeat's full summary. *_all_s "
                   "count every frame sent, a failed one as a miss (null: more than the percentile's share "
                   "failed); p50_s/p95_s/p99_s are over results only",
        "emulation": "device model: every node of every run makes a stage take its slowdown (device speed x "
                     "transient) x the device model's time of the stage's blocks at the ratio it runs (computes, "
                     "then sleeps the rest); no CPU is burnt, so N emulated nodes share this host",
        "device_model": device_model.to_dict(), "device_model_path": str(model_path), "devices_check": check,
        "host": {"cpus": os.cpu_count(), "load_avg_1m_at_start": load_at_start,
                 "load_avg_1m_at_end": os.getloadavg()[0]},
        "slo_s": scenario.slo_s, "duration_s": scenario.duration_s, "nodes": scenario.nodes,
        "imbalance": scenario.imbalance,
        "slowdowns": [vars(e) for e in scenario.slowdowns], "arrivals": scenario.arrivals,
        **chosen, "policies": {p: results[p] for p in policies},
    }
    if args.rates:
        document["rate_sweep"] = sweep
        document["rate_sweep_runs"] = {k: v for k, v in results.items() if k not in policies}
    return checked(finished(document, args.plots))


def checked(document: dict) -> dict:
    """The document, failed (``failure``: the command exits non-zero) if its policies ran on different devices."""
    check = document.get("devices_check")
    if check and not check["passed"]:
        document["failure"] = ("the policies ran on different emulated devices, so they cannot be compared:\n  "
                               + "\n  ".join(check["failures"]))
    return document


def merged(documents: list[dict]) -> dict:
    """One document from several invocations' JSONs of one scenario on one device model: a policy (at a rate) that
    more than one ran has all their runs as its repeats, and the devices check is redone over every run of all of
    them: invocations run side by side are one comparison only if their emulated devices agree, which their own
    checks cannot tell."""
    if len(documents) == 1:
        return documents[0]
    first = documents[0]
    for other in documents[1:]:
        if other["scenario"] != first["scenario"] or other.get("device_model") != first.get("device_model"):
            raise SystemExit("--replot: the JSONs are not the same scenario on the same device model "
                             f"({first['scenario']!r}, {other['scenario']!r}); they cannot be one comparison")
    runs: dict[str, dict[str, list[dict]]] = {"policies": {}, "rate_sweep_runs": {}}
    for d in documents:
        for key, by_name in runs.items():
            for name, result in d.get(key, {}).items():
                by_name.setdefault(name, []).extend(result.get("runs", [result]))
    document = {k: v for k, v in first.items() if k not in ("rate_sweep_runs", "rate_sweep", "failure")}
    document.update(host=[d.get("host") for d in documents],
                    repeats=max(len(r) for by_name in runs.values() for r in by_name.values()),
                    policies={name: aggregate(r) for name, r in runs["policies"].items()})
    if runs["rate_sweep_runs"]:
        document["rate_sweep_runs"] = {name: aggregate(r) for name, r in runs["rate_sweep_runs"].items()}
        at_rate = {(1.0, name): result for name, result in document["policies"].items()}
        at_rate.update({(float(key.rsplit(" x", 1)[1]), key.rsplit(" x", 1)[0]): result
                        for key, result in document["rate_sweep_runs"].items()})
        document["rate_sweep"] = [sweep_row(rate, policy, result, first["duration_s"])
                                  for (rate, policy), result in sorted(at_rate.items())]
    served = {f"{name}#{i + 1}": run["served_stage_times"] for by_name in runs.values()
              for name, name_runs in by_name.items() for i, run in enumerate(name_runs) if "served_stage_times" in run}
    document["devices_check"] = devices_check(served, first.get("devices_check", {}).get("tolerance",
                                                                                          DEVICES_TOLERANCE))
    return document


def finished(document: dict, plots: Path | None) -> dict:
    """The figures derived from a run's JSON (slowdown figures per run, then over repeats; the tables) and its
    plots, if asked for. A JSON written before repeats (one summary per policy) is read as one repeat."""
    for name, result in list(document["policies"].items()):
        runs = result.get("runs", [result])
        for run_result in runs:
            in_slowdowns(run_result, document)
        document["policies"][name] = aggregate(runs)
    document["tables"] = {f"bench pipeline: {document['scenario']}": table(document)}
    if document.get("devices_check"):
        document["tables"][describe_check(document["devices_check"])] = [
            {"node": c["node"], "blocks": "{}..{}".format(*c["blocks"]), "ratio": c["ratio"],
             "slowdown": c["slowdown"], "spread_%": 100 * c["spread"], "min_ms": min(c["median_ms"].values()),
             "max_ms": max(c["median_ms"].values()), "runs": len(c["median_ms"])}
            for c in document["devices_check"]["compared"]]
    if document.get("rate_sweep"):
        document["tables"][f"attainment against arrival rate: {document['scenario']}"] = [
            {"rate_x": r["rate_multiplier"], "arrival_hz": r["arrival_hz"], "policy": r["policy"],
             "frames": cell(r["frames"]), "attain_%": cell(r["attainment"], 100),
             "p50_all_ms": _all_frames(r, "p50_all_s"), "p95_all_ms": _all_frames(r, "p95_all_s"),
             "acc_meas": cell(r["accuracy_measured"]), "prunes": cell(r["prune_events"]),
             "load_1m": _mean_load(r)}
            for r in document["rate_sweep"]]
        document["rate_comparison"] = against_none(document["rate_sweep"])
        if document["rate_comparison"]:
            document["tables"][f"each policy against none, per rate: {document['scenario']}"] = \
                document["rate_comparison"]
    if plots:
        from edgeprune.bench.pipeline_plots import plot_all

        for path in plot_all(document, plots):
            print(f"wrote {path}")
    return document


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _ms(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 1000.0 * x
