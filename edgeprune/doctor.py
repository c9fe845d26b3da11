"""``edgeprune doctor``: one command a technician runs on any device to see what is wrong and how to fix it.

Two halves on purpose: :func:`gather` collects :class:`Facts` (the broker, retained topics, the clock
beacon, disk, memory, systemd, the gateway's error table) and every check is a pure function of those
facts returning ok / warning / fail with the fix in one line, so each failure path is unit-tested
without a device.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from shared.clock import ClockOffset, offset_suspect
from shared.schemas import ClockBeacon, NodeProfile, Placement, parse_json
from shared.settings import GatewaySettings, MqttSettings, NodeSettings
from shared.topics import AVAILABILITY_ONLINE, Topics

ROLES = ("gateway", "node", "camera")
OK, WARNING, FAIL = "ok", "warning", "fail"
CONFIG_FILE = "/etc/edgeprune/edgeprune.toml"
# systemd units per role (install.sh --systemd writes the edgeprune-* ones; chrony keeps the site's time)
UNITS = {"gateway": ("edgeprune-broker", "edgeprune-gateway", "edgeprune-web", "chrony"),
         "node": ("edgeprune-node", "chrony"), "camera": ("edgeprune-camera", "chrony")}
MEMORY_FAIL_MB, MEMORY_WARN_MB = 150.0, 300.0
ERROR_RECENT_S = 3600.0


@dataclass
class Facts:
    """Everything the checks look at, gathered once."""

    role: str
    now: float
    broker: str                                  # "host:port" as configured
    connected: bool = False
    refusal: str | None = None                   # the broker's reason for refusing the login
    gateway_id: str = "gateway"
    gateway_status: str | None = None            # retained availability of the gateway
    node_id: str | None = None                   # this device's node id (role node)
    statuses: dict[str, str] = field(default_factory=dict)       # retained node availabilities
    fingerprints: dict[str, str] = field(default_factory=dict)   # node id -> model fingerprint (retained profiles)
    placement: Placement | None = None
    configured_nodes: list[str] = field(default_factory=list)    # [gateway] nodes
    local_fingerprint: str | None = None         # the model this device would run (gateway, node)
    clock_offset_s: float | None = None          # this device minus the gateway, from the beacon
    max_clock_offset_s: float = 0.05
    disk_path: str = "/"
    disk_free_mb: float = 0.0
    min_free_mb: float = 1024.0
    memory_available_mb: float | None = None
    units: dict[str, str] | None = None          # unit -> `systemctl is-active`; None: systemd not running
    errors: list[dict] | None = None             # the gateway's latest error records, newest first


@dataclass(frozen=True)
class Check:
    name: str
    level: str
    message: str
    fix: str = ""


def _needs_broker(name: str, facts: Facts) -> Check | None:
    if facts.connected:
        return None
    return Check(name, WARNING, "not checked: no broker connection (see broker)")


def check_broker(f: Facts) -> Check:
    if f.connected:
        return Check("broker", OK, f"connected to {f.broker} with the configured credentials")
    if f.refusal:
        return Check("broker", FAIL, f"{f.broker} refused the login: {f.refusal}",
                     f"set [mqtt] username and password in {CONFIG_FILE} to this role's credentials (install.sh "
                     "prints them on the gateway)")
    return Check("broker", FAIL, f"cannot reach the broker at {f.broker}",
                 f"check the gateway is powered and on the network, [mqtt] host in {CONFIG_FILE}, and on the "
                 "gateway `systemctl status edgeprune-broker`")


def check_gateway(f: Facts) -> Check:
    if skipped := _needs_broker("gateway", f):
        return skipped
    if f.gateway_status == AVAILABILITY_ONLINE:
        return Check("gateway", OK, f"{f.gateway_id} is online")
    seen = f"says {f.gateway_status!r}" if f.gateway_status else "has never connected to this broker"
    return Check("gateway", FAIL, f"{f.gateway_id} {seen}",
                 "on the gateway: `sudo systemctl restart edgeprune-gateway`, then `journalctl -u edgeprune-gateway`")


def check_membership(f: Facts) -> Check:
    """Is this device known to the gateway (node), or are the configured nodes there (gateway)?"""
    if skipped := _needs_broker("membership", f):
        return skipped
    placed = set(f.placement.node_ids()) if f.placement else set()  # the ingest node is answered before
    if f.role == "node":
        node = f.node_id
        if f.statuses.get(node) != AVAILABILITY_ONLINE:
            return Check("membership", FAIL, f"node {node} is not online on the broker "
                         f"(status {f.statuses.get(node, 'never seen')!r})",
                         "`sudo systemctl restart edgeprune-node`; check [node] node_id is unique on the site")
        if node not in f.fingerprints:
            return Check("membership", FAIL, f"node {node} is online but has not offered its profile",
                         "wait a minute after start (it profiles the model), then `journalctl -u edgeprune-node`")
        job = f.placement.job_of(node) if f.placement else None
        if job is None:
            return Check("membership", WARNING, f"node {node} is online but not in the placement "
                         f"(placed: {', '.join(sorted(placed)) or 'none yet'})",
                         f"add \"{node}\" to [gateway] nodes in the gateway's {CONFIG_FILE} and restart "
                         "edgeprune-gateway (or it is a spare: fine)")
        if job.ingest:
            return Check("membership", OK, f"node {node} decodes the camera frames for stage 1 (the ingest node) "
                         f"in placement v{f.placement.version}")
        others = [n for n in job.assignment.nodes if n != node]
        shared = f", shared with {', '.join(others)} (replicas)" if others else ""
        return Check("membership", OK, f"node {node} runs stage {job.stage} (blocks {job.first_block}–"
                     f"{job.last_block}{shared}) of placement v{f.placement.version}")
    if f.role == "gateway":
        missing = [n for n in f.configured_nodes if f.statuses.get(n) != AVAILABILITY_ONLINE]
        if f.placement is None:
            return Check("membership", FAIL, "no placement published yet "
                         f"(offline: {', '.join(missing) or 'none'})",
                         "start the nodes listed in [gateway] nodes; check each with `edgeprune doctor --role node`")
        if missing:
            return Check("membership", WARNING, f"configured nodes offline: {', '.join(missing)}",
                         "power them up or run `edgeprune doctor` on them; remove dead ones from [gateway] nodes")
        return Check("membership", OK, f"all {len(f.configured_nodes)} configured nodes online; placement "
                     f"v{f.placement.version}: {pipeline_words(f.placement)}")
    return Check("membership", OK, "cameras need no registration: they publish on camera/<id>/frame")


def pipeline_words(placement: Placement) -> str:
    """Every placed node, hop by hop: the ingest node, then each stage with all the nodes serving it; parallel
    pipelines one after the other, each named."""
    ingest = [f"ingest {placement.ingest_node}"] if placement.ingest_node else []
    pipelines = placement.pipelines
    return "; ".join((f"pipeline {j}: " if len(pipelines) > 1 else "") + " → ".join(
        ingest + [f"stage {s.stage} on {' + '.join(s.nodes)}" for s in stages]) for j, stages in enumerate(pipelines))


def check_clock(f: Facts) -> Check:
    if f.role == "gateway":
        return Check("clock", OK, "this device is the site's clock (chrony serves it to the other devices)")
    if skipped := _needs_broker("clock", f):
        return skipped
    fix = "check `chronyc sources` shows the gateway; install.sh --role ... --gateway-address ADDRESS sets it"
    if f.clock_offset_s is None:
        return Check("clock", WARNING, "no time beacon from the gateway: offset unknown",
                     "make sure edgeprune-gateway runs (it sends the beacon every few seconds)")
    if offset_suspect(f.clock_offset_s, f.max_clock_offset_s):
        return Check("clock", FAIL, f"clock is {f.clock_offset_s * 1e3:+.0f} ms off the gateway's "
                     f"(limit {f.max_clock_offset_s * 1e3:.0f} ms): end-to-end latencies are wrong", fix)
    return Check("clock", OK, f"clock is {f.clock_offset_s * 1e3:+.1f} ms off the gateway's "
                 f"(limit {f.max_clock_offset_s * 1e3:.0f} ms; includes the beacon's delivery time)")


def check_model(f: Facts) -> Check:
    if skipped := _needs_broker("model", f):
        return skipped
    seen = dict(f.fingerprints)
    if f.local_fingerprint:
        seen["this device"] = f.local_fingerprint
    groups: dict[str, list[str]] = {}
    for who, fingerprint in sorted(seen.items()):
        groups.setdefault(fingerprint, []).append(who)
    if not groups:
        return Check("model", WARNING, "no node has offered a profile yet: nothing to compare",
                     "start the nodes; each offers its model fingerprint when it starts")
    if len(groups) == 1:
        ((fingerprint, who),) = groups.items()
        return Check("model", OK, f"one model everywhere (fingerprint {fingerprint}, {len(who)} devices)")
    reference = f.local_fingerprint or max(groups, key=lambda k: len(groups[k]))
    odd = sorted(w for fp, who in groups.items() if fp != reference for w in who)
    listed = "; ".join(f"{fp}: {', '.join(who)}" for fp, who in groups.items())
    return Check("model", FAIL, f"different model checkpoints ({listed}); {', '.join(odd)} cannot be placed",
                 "copy the same checkpoint ([node] checkpoint, default shared/assets/trapnet.pt) to every device "
                 "and restart it")


def check_disk(f: Facts) -> Check:
    where = f"{f.disk_free_mb / 1024:.1f} GB free on {f.disk_path}"
    if f.min_free_mb > 0 and f.disk_free_mb < f.min_free_mb:
        return Check("disk", FAIL, f"{where} (below {f.min_free_mb:.0f} MB: the gateway stops storing detail)",
                     "copy the database off (field guide: collect the database), then delete old files or "
                     "lower [gateway] keep_days")
    if f.disk_free_mb < 2 * f.min_free_mb:
        return Check("disk", WARNING, f"{where}: getting low", "collect the database on the next visit")
    return Check("disk", OK, where)


def check_memory(f: Facts) -> Check:
    if f.memory_available_mb is None:
        return Check("memory", WARNING, "cannot read /proc/meminfo", "run doctor on the device itself (Linux)")
    shown = f"{f.memory_available_mb:.0f} MB available"
    if f.memory_available_mb < MEMORY_FAIL_MB:
        return Check("memory", FAIL, shown, "stop other programs on this device or reboot it; "
                     "set a smaller [node] memory_mb")
    if f.memory_available_mb < MEMORY_WARN_MB:
        return Check("memory", WARNING, shown, "check `top` for other programs using memory")
    return Check("memory", OK, shown)


def check_units(f: Facts) -> Check:
    if f.units is None:
        return Check("services", WARNING, "systemd is not running here: nothing restarts the services",
                     f"on a Pi install with `./install.sh --role {f.role} --systemd`")
    down = {u: state for u, state in f.units.items() if state != "active"}
    if down:
        shown = ", ".join(f"{u} {state}" for u, state in down.items())
        first = next(iter(down))
        return Check("services", FAIL, shown,
                     f"`sudo systemctl restart {first}` and read `journalctl -u {first} -n 50`")
    return Check("services", OK, f"{', '.join(f.units)} active")


def check_errors(f: Facts) -> Check:
    if f.role != "gateway":
        return Check("errors", OK, "error records are kept on the gateway: run doctor there to see them")
    if f.errors is None:
        return Check("errors", WARNING, "no database yet", "start edgeprune-gateway (it creates the database)")
    recent = [e for e in f.errors if f.now - e["ts"] <= ERROR_RECENT_S]
    if not recent:
        last = f", last {(f.now - f.errors[0]['ts']) / 3600:.1f} h ago" if f.errors else ""
        return Check("errors", OK, f"no error records in the last hour{last}")
    e = recent[0]
    return Check("errors", WARNING, f"{len(recent)}{'+' if len(recent) == len(f.errors) else ''} error records in "
                 f"the last hour; latest from {e['component']} [{e['kind']}]: {e['message'][:120]}",
                 "see the operator page's error table; a repeating kind names the device to look at")


CHECKS: tuple[Callable[[Facts], Check], ...] = (
    check_broker, check_gateway, check_membership, check_clock, check_model, check_disk, check_memory,
    check_units, check_errors)


def run_checks(facts: Facts) -> list[Check]:
    return [check(facts) for check in CHECKS]


def report(facts: Facts, checks: list[Check]) -> str:
    who = f"role {facts.role}" + (f", node {facts.node_id}" if facts.role == "node" else "")
    lines = [f"edgeprune doctor: {who}, broker {facts.broker}"]
    for c in checks:
        lines.append(f"  {c.level.upper() if c.level == FAIL else c.level:8} {c.name:11} {c.message}")
        if c.fix and c.level != OK:
            lines.append(f"  {'':8} {'':11} fix: {c.fix}")
    counts = {level: sum(c.level == level for c in checks) for level in (OK, WARNING, FAIL)}
    lines.append(f"{counts[OK]} ok, {counts[WARNING]} warning, {counts[FAIL]} fail")
    return "\n".join(lines)


# --- gathering (I/O) ---------------------------------------------------------------------------
def infer_role(unit_files: list[str]) -> str | None:
    """The role install.sh --systemd set up here, from the unit files it wrote."""
    for role in ROLES:
        if f"edgeprune-{role}.service" in unit_files:
            return role
    return None


def installed_units(unit_dir: Path = Path("/etc/systemd/system")) -> list[str]:
    return sorted(p.name for p in unit_dir.glob("edgeprune-*.service")) if unit_dir.is_dir() else []


def unit_states(role: str) -> dict[str, str] | None:
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return None
    states = {}
    for unit in UNITS[role]:
        done = subprocess.run(["systemctl", "is-active", f"{unit}.service"], capture_output=True, text=True)
        states[unit] = done.stdout.strip() or "unknown"
    return states


def memory_available_mb(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def read_errors(db_path: Path, limit: int = 50) -> list[dict] | None:
    """The gateway's latest error records, newest first; None without a readable database."""
    from gateway.store import Reader

    try:
        with closing(Reader(db_path)) as reader:
            return reader.errors(limit)
    except (FileNotFoundError, sqlite3.Error):  # no file yet, no tables yet, or not a database
        return None


def listen(mqtt_settings: MqttSettings, gateway: GatewaySettings, facts: Facts, connect_s: float,
           beacons: int = 3) -> None:
    """Connect like any component and collect the retained state and a few clock beacons into ``facts``."""
    from shared.bus import Bus  # paho stays out of the pure checks' import

    topics = Topics(mqtt_settings.topic_root)
    me = f"doctor-{socket.gethostname()}"[:64].replace(".", "-")
    bus = Bus(mqtt_settings, me, topics.component_status(me))
    lock = threading.Lock()
    clock = ClockOffset()
    enough_beacons = threading.Event()
    received = [0]

    def on_node_status(topic: str, payload: bytes, _p) -> None:
        node = topics.node_id_from_topic(topic)
        if node and payload:
            with lock:
                facts.statuses[node] = payload.decode("utf-8", "replace")

    def on_profile(topic: str, payload: bytes, _p) -> None:
        if payload:
            offer = parse_json(NodeProfile, payload)
            with lock:
                facts.fingerprints[offer.node_id] = offer.model_fingerprint

    def on_placement(topic: str, payload: bytes, _p) -> None:
        if payload:
            facts.placement = parse_json(Placement, payload)

    def on_gateway_status(topic: str, payload: bytes, _p) -> None:
        facts.gateway_status = payload.decode("utf-8", "replace") or None

    def on_beacon(topic: str, payload: bytes, _p) -> None:
        arrived = time.time()
        with lock:
            clock.add(parse_json(ClockBeacon, payload).ts, arrived)
            received[0] += 1
            if received[0] >= beacons:
                enough_beacons.set()

    for topic_filter, handler in ((topics.node_status_filter, on_node_status), (topics.node_profile_filter, on_profile),
                                  (topics.placement, on_placement),
                                  (topics.component_status(gateway.gateway_id), on_gateway_status),
                                  (topics.clock, on_beacon)):
        bus.subscribe(topic_filter, handler, qos=0 if topic_filter == topics.clock else 1)
    bus.start(wait_s=connect_s)
    try:
        facts.connected = bus.connected
        facts.refusal = bus.refusal
        if facts.connected:
            enough_beacons.wait(beacons * gateway.clock_beacon_s + 1.0)
    finally:
        bus.stop()
    with lock:
        facts.clock_offset_s = clock.offset_s


def gather(role: str, config: Path | None, mqtt_settings: MqttSettings, connect_s: float = 5.0) -> Facts:
    """Collect every fact for ``role`` on this device (connects to the broker for a few seconds)."""
    from shared.settings import load

    gateway = load(GatewaySettings, config)
    node = load(NodeSettings, config)
    facts = Facts(role=role, now=time.time(), broker=f"{mqtt_settings.host}:{mqtt_settings.port}",
                  gateway_id=gateway.gateway_id, node_id=node.node_id if role == "node" else None,
                  configured_nodes=list(gateway.nodes), max_clock_offset_s=gateway.max_clock_offset_s,
                  min_free_mb=gateway.min_free_mb)
    disk = existing_parent(gateway.db_path.parent if role == "gateway" else Path("/"))
    facts.disk_path = str(disk)
    facts.disk_free_mb = shutil.disk_usage(disk).free / 2**20
    facts.memory_available_mb = memory_available_mb()
    facts.units = unit_states(role)
    if role == "gateway":
        facts.errors = read_errors(gateway.db_path)
    if role in ("gateway", "node"):
        from shared.model import build_model, model_fingerprint

        facts.local_fingerprint = model_fingerprint(build_model(node.checkpoint if role == "node" else None))
    listen(mqtt_settings, gateway, facts, connect_s)  # a malformed message is reported by the bus, not raised
    facts.now = time.time()
    return facts
