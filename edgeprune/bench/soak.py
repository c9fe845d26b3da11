"""Soak: the pipeline under a bursty camera trace through node kills and hangs, a broker restart, a
gateway restart, one large burst, bad frames, forged messages from every role and a replica's death; where every
frame went, per fault (attempted = rows + failures + unaccounted).

One phase per fault, each ``--minutes / 4`` long: frames flow, the fault hits a quarter into the phase,
the pipeline recovers, then the phase drains. Frames are published by this process as camera
``cam-soak`` (QoS 1, request id ``<fault>-<n>``), so *attempted* is exact; rows and failures come from
the gateway's database. ``recovery_s`` is the time from the fault to the first stored result of a frame
sent after it. ``max_rss_mb`` is each process's peak resident memory (VmHWM), the largest over restarts.
After the gateway restart, ``controller_back_s`` is how long until its pruning controller ran again. The
``bad_input`` phase sends :data:`BAD_FRAMES` among the good ones (each must end as a recorded failure); the
``forged`` phase tries every forgery of :mod:`edgeprune.bench.intruder` (each refused by the broker, or rejected
by the gateway with a recorded reason, nothing stored).

``burst`` sends ``--big-burst`` frames back to back at the fault time. Drops are counted where they happen: a full
work queue is a recorded failure (``dropped``); a frame beyond the broker's own per-client queue
(``[broker] max_queued_messages``) is dropped by Mosquitto, which still acknowledges it to the camera (PUBACK 0,
measured) and only logs "Outgoing messages are being dropped for client X" once per episode, so ``broker_dropped``
is the frames the camera had acknowledged that never reached stage 1, counted only when the broker logged such a
notice in the phase (``broker_drop_notices``: the clients it named); ``broker_refused`` is a PUBACK failure code.

``replica_death`` needs a replicated stage, which the other phases must not have (a killed or hung stage would be a
replica's death too). So it runs last, and before it (not counted) the gateway is restarted with
``placement_mode = "data"``: the same two nodes become replicas of one stage (as in tests/test_replicas_e2e.py); a
third node would add nothing but load. A quarter in, a regular ``--burst`` is sent (so the victim's session holds
frames), then one replica is SIGKILLed and restarted after ``--down-s``; what it held must be re-served by the
survivor (``handed_over``: the inputs the gateway took back from its session), a frame served by both is a
``duplicate``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np

from camera.publisher import FramePublisher
from camera.simulator import camera_frame
from edgeprune.bench import intruder
from edgeprune.broker import free_port
from edgeprune.credentials import default_users
from edgeprune.launcher import SiteLauncher
from gateway.store import Reader
from shared.settings import BrokerSettings, MqttSettings

# replica_death last: the site is re-placed with replicated stages for it (module docstring)
FAULTS = ["node_kill", "node_hang", "broker_restart", "gateway_restart", "burst", "bad_input", "forged",
          "replica_death"]
CAMERA = "cam-soak"
# what a broken or hostile camera sends as a frame: each must be recorded as a failure with its request id
BAD_FRAMES = {"empty": b"", "text": b"not an image at all", "truncated_jpeg": None, "random_bytes": None,
              "png_signature_then_garbage": b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50}


def add_arguments(parser) -> None:
    parser.add_argument("--minutes", type=float, default=30.0, help="total length (fractions allowed: 1 = smoke run)")
    parser.add_argument("--run-dir", type=Path, default=Path("run/soak"), help="logs, broker data and database")
    parser.add_argument("--rate", type=float, default=4.0, help="mean frames per second between bursts")
    parser.add_argument("--burst", type=int, default=30, help="frames sent back to back every --burst-every s")
    parser.add_argument("--burst-every", type=float, default=20.0)
    parser.add_argument("--big-burst", type=int, default=400, help="frames sent back to back by the burst phase")
    parser.add_argument("--down-s", type=float, default=5.0, help="how long a killed or hung part stays down")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flow-control", action="store_true",
                        help="nodes take one input at a time ([node] flow_control): a burst waits in the broker "
                             "instead of being shed by the node's work queue")
    parser.add_argument("--settle-s", type=float, default=120.0,
                        help="after each phase, wait at most this long for every frame sent to end as a row or a "
                             "recorded failure (those still open are reported as unaccounted)")


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Site(SiteLauncher):
    """Broker, gateway and two nodes as processes, each logged in with its own user; the peak memory of each kind
    of process, sampled whenever one ends."""

    def __init__(self, run_dir: Path, flow_control: bool = False):
        run_dir = run_dir.resolve()
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        port = free_port()
        self.node_ids = ["node-1", "node-2"]
        self.db = run_dir / "edgeprune.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")}
        env.update({"EDGEPRUNE_MQTT_PORT": str(port), "PYTHONUNBUFFERED": "1",
                    "EDGEPRUNE_GATEWAY_DB_PATH": str(self.db), "EDGEPRUNE_GATEWAY_NODES": ",".join(self.node_ids),
                    "EDGEPRUNE_GATEWAY_RESULT_TIMEOUT_S": "30", "EDGEPRUNE_GATEWAY_REJOIN_HOLD_S": "3",
                    "EDGEPRUNE_GATEWAY_STATS_SILENCE_S": "5", "EDGEPRUNE_NODE_STATS_INTERVAL_S": "1",
                    "EDGEPRUNE_NODE_UPLINK_MBIT_S": "100000", "EDGEPRUNE_MQTT_RECONNECT_MAX_S": "4",
                    "EDGEPRUNE_NODE_FLOW_CONTROL": str(flow_control).lower()})
        super().__init__(run_dir, BrokerSettings(port=port, data_dir=run_dir / "broker"),
                         default_users(self.node_ids, [CAMERA]), env)
        self.rss: dict[str, float] = {}

    def start_component(self, name: str) -> None:
        self.start(name, ["gateway"] if name == "gateway" else ["node", "--node-id", name])

    def sample_rss(self) -> None:
        for name, proc in self.procs.items():
            rss = peak_rss_mb(proc.pid) if proc.poll() is None else None
            if rss is not None:
                kind = "node" if name.startswith("node") else name
                self.rss[kind] = max(self.rss.get(kind, 0.0), rss)

    def signal(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.sample_rss()
        super().signal(name, sig)

    def stop(self, name: str) -> None:
        self.sample_rss()
        super().stop(name)

    def reader(self) -> Reader | None:
        try:
            return Reader(self.db)
        except FileNotFoundError:
            return None

    def stages(self) -> list[str]:
        reader = self.reader()
        placement = reader.placement() if reader else None
        return [s["node_id"] for s in placement["stages"]] if placement else []

    def replicas(self) -> list[str]:
        """The nodes of the placement's first replicated stage (none: no stage has replicas)."""
        reader = self.reader()
        placement = reader.placement() if reader else None
        for stage in placement["stages"] if placement else []:
            if stage.get("replicas"):
                return [stage["node_id"], *stage["replicas"]]
        return []

    def replicate(self) -> None:
        """Restart the gateway (cleanly) placing in ``data`` mode: every node a replica of one stage."""
        self.stop("gateway")
        self.env["EDGEPRUNE_GATEWAY_PLACEMENT_MODE"] = "data"
        self.restart("gateway")


class Camera:
    """Publishes the bursty trace as one camera (through the camera's own :class:`FramePublisher`, logged in as
    :data:`CAMERA`); counts every frame it tried to send."""

    def __init__(self, site: Site, seed: int):
        mqtt = MqttSettings(host="127.0.0.1", port=site.port, username=CAMERA,
                            password=site.credentials.password(CAMERA), tls_ca=None, topic_root="edgeprune",
                            reconnect_max_s=4)
        self.publisher = FramePublisher(mqtt, CAMERA, on_refused=self._on_refused)
        rng = np.random.default_rng(seed)
        self.frames = [camera_frame(rng, 96, "jpeg") for _ in range(8)]
        self.random = random.Random(seed)
        # the trace and the injector thread (bursts, bad frames) both send: numbering and counts under one lock
        self._lock = threading.Lock()
        self.attempted: dict[str, int] = {}
        self._phase_of: dict[int, str] = {}  # mid -> phase
        # PUBACKs with a failure reason code; a lock of their own, since paho calls on_publish holding the lock its
        # publish() takes: waiting there for ``_lock`` (held around publish) would deadlock
        self._acks = threading.Lock()
        self._refused_mids: list[int] = []
        self.publisher.start()

    def send(self, phase: str, count: int = 1):
        """``count`` frames back to back; the last one's publish info (to wait until the broker has them)."""
        info = None
        with self._lock:
            first = self.attempted.get(phase, 0)
            for n in range(first, first + count):
                info = self._publish(phase, f"{phase}-{n:06d}", self.frames[n % len(self.frames)])
            self.attempted[phase] = first + count
        return info

    def send_bad(self, phase: str) -> int:
        """Each of :data:`BAD_FRAMES` once (request ids ``<phase>-bad-<kind>``); they count as attempted."""
        made = {"truncated_jpeg": self.frames[0][:64], "random_bytes": self.random.randbytes(2048)}
        with self._lock:
            for kind, payload in BAD_FRAMES.items():
                self._publish(phase, f"{phase}-bad-{kind}", made.get(kind, payload))
            self.attempted[phase] = self.attempted.get(phase, 0) + len(BAD_FRAMES)
        return len(BAD_FRAMES)

    def _publish(self, phase: str, request_id: str, payload: bytes):
        info = self.publisher.publish(payload, {"request_id": request_id})
        self._phase_of[info.mid] = phase
        return info

    def _on_refused(self, mid: int) -> None:
        with self._acks:
            self._refused_mids.append(mid)

    def refused(self, phase: str) -> int:
        """The phase's frames the broker refused (a PUBACK failure reason code)."""
        with self._lock, self._acks:
            return sum(self._phase_of.get(mid) == phase for mid in self._refused_mids)

    def run(self, phase: str, seconds: float, rate: float, burst: int, burst_every: float) -> None:
        end = time.monotonic() + seconds
        next_burst = time.monotonic() + burst_every / 2
        while time.monotonic() < end:
            if time.monotonic() >= next_burst:
                for _ in range(burst):
                    self.send(phase)
                next_burst += burst_every
            self.send(phase)
            time.sleep(min(self.random.expovariate(rate), max(end - time.monotonic(), 0)))

    def close(self) -> None:
        self.publisher.stop()


def accounting(reader: Reader, phase: str, attempted: int, fault_ts: float) -> dict:
    found = reader.prefix_accounting(f"{phase}-", fault_ts)
    by_reason = found["failures_by_reason"]
    failures = sum(by_reason.values())
    return {"fault": phase, "attempted": attempted, "accepted": found["accepted"], "rows": found["rows"],
            "failures": failures, "unaccounted": attempted - found["rows"] - failures,
            "in_flight": found["accepted"] - found["rows"] - failures,
            "never_reached": attempted - found["traced"], "lost": by_reason.get("lost", 0),
            "dropped": by_reason.get("dropped", 0), "duplicates": found["duplicates"],
            "failure_reasons": ", ".join(f"{reason}:{n}" for reason, n in by_reason.items()),
            "recovery_s": round(found["first_result_ts"] - fault_ts, 2) if found["first_result_ts"] else None}


BROKER_DROP_NOTICE = re.compile(r"^(\d+): Outgoing messages are being dropped for client (\S+?)\.?$", re.MULTILINE)


def broker_drop_notices(log_text: str, since: float, until: float) -> list[str]:
    """The clients Mosquitto's log (``log_timestamp``: epoch seconds) says it dropped messages for between
    ``since`` and ``until``: its only trace of a full per-client queue (once per episode, not per message)."""
    return sorted({m[2] for m in BROKER_DROP_NOTICE.finditer(log_text) if since - 1 <= int(m[1]) <= until})


def with_broker_drops(row: dict, notices: list[str], refused: int) -> dict:
    """The phase's frames the broker refused (a PUBACK failure code) or dropped: those it acknowledged that never
    reached stage 1 (``never_reached``) count as ``broker_dropped`` only if the broker logged a drop in the phase;
    without one they are only unaccounted (e.g. still queued when the settle gave up)."""
    dropped = row["never_reached"] - refused if notices else 0
    return {**row, "broker_refused": refused, "broker_dropped": max(dropped, 0),
            "broker_drop_notices": ", ".join(notices)}


HANDOVER = re.compile(r"is gone: (\d+) inputs its session held")


def handed_over(messages: list[str]) -> int:
    """Inputs the gateway took back from gone nodes' sessions, summed over its ``handover`` records."""
    return sum(int(m[1]) for m in map(HANDOVER.search, messages) if m)


def bad_input_accounting(reader: Reader, phase: str) -> dict:
    """Where the bad frames went: each must be a failure row with its request id (the reasons say which)."""
    recorded = reader.failures_with_prefix(f"{phase}-bad-")
    stored = reader.prefix_accounting(f"{phase}-bad-", 0.0)["rows"]
    return {"bad_sent": len(BAD_FRAMES), "bad_recorded": len(recorded), "bad_stored_as_rows": stored,
            "bad_reasons": ", ".join(sorted(f"{r['request_id'].rsplit('-bad-', 1)[1]}:{r['reason']}"
                                            for r in recorded))}


def forged_accounting(reader: Reader, tried: list[dict], fault_ts: float) -> dict:
    recorded = len(reader.errors_since("identity_mismatch", fault_ts))
    stored = reader.records_with_prefix(intruder.FORGED_PREFIX)
    return intruder.verdict(tried, recorded, stored)


def forged_attempts(reader: Reader, tried: list[dict]) -> list[dict]:
    """Each forgery as issue 25's JSON lists it: role, topic, the identity it claimed, whether the broker refused it
    and ``stored``, the rows or failure records its request id produced (0 for a forgery that carries none; the
    phase's ``forged_stored`` counts every row under the forged prefix)."""
    return [{"role": r["role"], "login": r["login"], "topic": r["topic"], "claim": r["claim"], "expect": r["expect"],
             "refused": r["refused"], "puback": r["puback"],
             "stored": reader.records_of(r["request_id"]) if r["request_id"] is not None else 0} for r in tried]


def controller_enabled_after(site: Site, since: float, timeout_s: float = 120.0) -> float | None:
    """Seconds from ``since`` until the gateway's stored status says its pruning controller runs (None: not within
    ``timeout_s``): a restarted gateway must not leave pruning off (issue 25)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reader = site.reader()
        status = reader.controller_status_after(since) if reader else None
        if status and status.get("enabled"):
            return round(time.time() - since, 2)
        time.sleep(0.25)
    return None


def inject(site: Site, fault: str, args, camera: Camera, findings: dict) -> None:
    """Apply one fault and undo it after ``args.down_s`` (in this thread: the camera keeps sending meanwhile); what
    it measures itself goes into ``findings``."""
    down_s = args.down_s
    stages = site.stages() or site.node_ids
    if fault == "node_kill":
        victim = stages[-1]
        site.signal(victim)
        time.sleep(down_s)
        site.restart(victim)
    elif fault == "node_hang":
        victim = stages[0]
        site.signal(victim, signal.SIGSTOP)
        time.sleep(down_s * 3)
        site.signal(victim, signal.SIGCONT)
    elif fault == "broker_restart":
        site.stop("broker")
        time.sleep(min(down_s, 3.0))
        site.restart("broker")
    elif fault == "gateway_restart":
        site.signal("gateway")
        time.sleep(min(down_s, 3.0))
        started = time.time()
        site.restart("gateway")
        findings["controller_back_s"] = controller_enabled_after(site, started)
    elif fault == "burst":
        camera.send(fault, args.big_burst)
    elif fault == "replica_death":
        replicas = site.replicas()
        findings["replicas"] = ", ".join(replicas)
        if not replicas:
            return
        victim = findings["victim"] = replicas[-1]
        last = camera.send(fault, args.burst)
        try:
            if last:
                last.wait_for_publish(30)  # at the broker, shared out: the victim's session holds some
        except RuntimeError:  # sent while the camera was disconnected: paho sends it on reconnecting
            pass
        site.signal(victim)
        time.sleep(down_s)
        site.restart(victim)
    elif fault == "bad_input":
        camera.send_bad(fault)
    elif fault == "forged":
        findings["forged"] = intruder.try_all(site.port, site.credentials.password, site.node_ids, CAMERA)


def settled(row: dict) -> bool:
    """Every frame sent has ended as a row or a recorded failure. Not merely every frame stage 1 accepted: a frame
    still queued in the broker (e.g. for a hung node) is not accepted yet, and would be missed."""
    return row["rows"] + row["failures"] >= row["attempted"]


def settle(read, timeout_s: float, poll_s: float = 0.5, clock=time.monotonic, sleep=time.sleep) -> dict:
    """The phase's accounting once every frame is settled, or after ``timeout_s`` with those still open counted as
    ``unaccounted`` (``in_flight``: the part of them stage 1 accepted). ``read`` returns the accounting, or None
    while there is no database to read; ``settle_s`` says how long it took."""
    start = clock()
    while True:
        row = read()
        waited = clock() - start
        if row is not None and (settled(row) or waited >= timeout_s):
            return {**row, "settle_s": round(waited, 1)}
        if waited >= timeout_s:
            raise RuntimeError(f"no accounting to read within {timeout_s:g} s")
        sleep(poll_s)


def extra_findings(site: Site, fault: str, findings: dict, fault_ts: float) -> dict:
    """The fault's own figures beside the frame accounting."""
    reader = site.reader()
    if fault == "gateway_restart":
        return {"controller_back_s": findings.get("controller_back_s")}
    if fault == "bad_input" and reader:
        return bad_input_accounting(reader, fault)
    if fault == "forged" and reader:
        return forged_accounting(reader, findings.get("forged", []), fault_ts)
    if fault == "replica_death" and reader:
        messages = [r["message"] for r in reader.errors_since("handover", fault_ts)]
        return {"replicas": findings.get("replicas"), "victim": findings.get("victim"),
                "handed_over": handed_over(messages)}
    return {}


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def run(args) -> dict:
    site = Site(args.run_dir, args.flow_control)
    phase_s = max(args.minutes * 60 / len(FAULTS), 10.0)
    faults: list[dict] = []
    accounted: list[dict] = []  # the frame accounting alone, for the first table
    checks: list[dict] = []  # each fault's own figures (controller, bad frames, forgeries): a second table
    forged: list[dict] = []  # each forgery of the forged phase
    camera = None
    try:
        site.start_broker()
        site.start_component("gateway")
        for node_id in site.node_ids:
            site.start_component(node_id)
        if not wait_for(lambda: len(site.stages()) == 2, 180):
            raise SystemExit(f"the pipeline did not form within 180 s; see {site.run_dir}/*.log")
        camera = Camera(site, args.seed)
        for fault in FAULTS:
            if fault == "replica_death":
                print(f"{fault}: re-placing the two nodes as replicas of one stage", flush=True)
                site.replicate()
                if not wait_for(lambda: len(site.replicas()) == 2, 180):
                    print(f"{fault}: no replicated stage within 180 s, phase skipped", flush=True)
                    faults.append({"fault": fault, "skipped": "no replicated stage within 180 s"})
                    continue
            print(f"{fault}: {phase_s:.0f} s of traffic, the fault a quarter in", flush=True)
            phase_start = time.time()
            fault_ts = phase_start + phase_s / 4
            findings: dict = {}
            injector = threading.Timer(phase_s / 4, inject, (site, fault, args, camera, findings))
            injector.daemon = True  # Ctrl-C must not wait for (or leave behind) a pending fault
            injector.start()
            camera.run(fault, phase_s, args.rate, args.burst, args.burst_every)
            injector.join()
            site.sample_rss()

            def read(fault=fault, fault_ts=fault_ts) -> dict | None:
                reader = site.reader()
                return reader and accounting(reader, fault, camera.attempted.get(fault, 0), fault_ts)
            # each frame ends as a result, a failure report or, at the latest, the gateway's result timeout
            row = settle(read, args.settle_s)
            notices = broker_drop_notices((site.run_dir / "mosquitto.log").read_text(errors="replace"),
                                          phase_start, time.time())
            row = with_broker_drops(row, notices, camera.refused(fault))
            if row["unaccounted"]:
                print(f"{fault}: {row['unaccounted']} frames still unsettled after {args.settle_s:g} s "
                      f"({row['in_flight']} of them accepted)", flush=True)
            extra = extra_findings(site, fault, findings, fault_ts)
            if fault == "forged" and (reader := site.reader()):
                forged = forged_attempts(reader, findings.get("forged", []))
            accounted.append(row)
            faults.append({**row, **extra})
            checks.extend({"fault": fault, "check": name, "value": value} for name, value in extra.items())
    finally:
        if camera:
            camera.close()
        site.stop_all()
    rss = {name: round(mb, 1) for name, mb in sorted(site.rss.items())}
    return {"minutes": args.minutes, "flow_control": args.flow_control, "faults": faults, "forged": forged,
            "max_rss_mb": rss,
            "tables": {"Where every frame went, per fault": accounted,
                       "What each fault's own checks found": checks,
                       "Each forgery: refused by the broker (135), or delivered and rejected; stored 0": [
                           {k: v for k, v in f.items() if k != "login"} for f in forged],
                       "Peak resident memory (VmHWM), MB": [{"process": k, "max_rss_mb": v} for k, v in rss.items()]}}
