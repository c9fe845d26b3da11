"""The central collector's write rate into PostgreSQL and SQLite from many bridged sites, its lag, what a bridge cut
and a database outage lose or duplicate, and what an ecologist's aggregate query every second costs the writes.

Everything real on loopback: a central Mosquitto, ``--sites`` site Mosquittos each bridged to it (the sites' own
bridge config), ``edgeprune collect`` as a subprocess, a PostgreSQL server made for the run (Debian's binaries,
fsync on) and an SQLite file. Every site's last stage is a ``mosquitto_pub`` at its site broker publishing results
(QoS 1) the benchmark makes, ``--rate`` in all (:class:`Publisher`). Per backend:

1. **sustained**: ``--seconds`` at ``--rate``; the measured window is the publishing after the first ``--warmup-s``;
   rows/s = rows the collector received (``received_at``) in that window / its length, while the offered rate
   (also reported) is held; lag = ``received_at`` - publish time of those rows (the row is committed within one
   writer batch later: ``FLUSH_INTERVAL_S`` plus the write); and each part's CPU over the window (cores used, and
   cores' worth of time its threads waited for a CPU: a starved part waits, a bound one is busy);
2. **with reads**: the same while another connection runs an aggregate query (rows per site and label of the last
   hour, mean confidence) every second;
3. **drain**: the collector stopped, ``--seconds`` at ``--rate`` queue at the central broker; the collector is
   started and drains them: rows / (last ``received_at`` - first), the collector's own capacity with no publisher
   competing for the CPU;
4. **faults**: publishing at ``--fault-rate``, the central broker is stopped for ``--cut-s`` (every bridge cut)
   and started again; then the database is made unavailable (PostgreSQL stopped; SQLite locked by another
   writer) for ``--cut-s``, the collector is SIGKILLed while it holds unwritten rows and started again, and the
   database is back. Lost = frames the site brokers acknowledged that never became a row; duplicated = rows
   beyond one per frame.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SITE_QUEUE = 200_000  # each site broker holds the bridge's backlog through the cut
CENTRAL_QUEUE = 1_000_000  # the collector's session at the central broker holds every site's backlog
AGGREGATE = ("SELECT site, label, count(*), avg(confidence) FROM requests WHERE capture_ts > ? "
             "GROUP BY site, label")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", type=int, default=20, help="bridged sites")
    parser.add_argument("--rate", type=float, default=6000.0, help="results per second offered, all sites together")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measured phase")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="start of each phase left out of the figures")
    parser.add_argument("--fault-rate", type=float, default=500.0, help="results per second during the faults")
    parser.add_argument("--cut-s", type=float, default=4.0, help="how long the bridges and the database are away")
    parser.add_argument("--backends", default="postgresql,sqlite", help="comma-separated: postgresql, sqlite")


def result_template() -> str:
    """A two-stage result as a last stage publishes it; ``RID`` and ``1234.5`` are its request id and capture time."""
    from shared.schemas import Hop, Result, to_json

    hops = [Hop(stage=s, node_id="pi-b" if s == 2 else "pi-a", prune_ratio=0.25, received_ts=1.0,
                started_ts=1.0, finished_ts=1.01, published_ts=1.01) for s in (1, 2)]
    return to_json(Result(request_id="RID", camera_id="trap-1", capture_ts=1234.5, label="deer", label_index=1,
                          scientific_name="Capreolus capreolus", confidence=0.9, hops=hops)).decode()


class Publisher:
    """Every site's last stage: one ``mosquitto_pub -l -q 1`` per site broker, fed result lines from a pipe.

    The results are made in this process (a unique request id each, the capture time the time it is handed over)
    and written a batch per site per tick; the MQTT work is Mosquitto's own C client, so the benchmark's publisher
    costs the shared CPU little beside the collector it measures (a paho client per site in Python took about
    half a core at 4,000 results/s and offered no more). A site's pipe that is full (its client waits for
    acknowledgements, ``-M`` in flight) blocks the tick: the offered rate then falls, and is reported."""

    MAX_INFLIGHT = 1000

    def __init__(self, ports: list[int]):
        self.clients = [subprocess.Popen(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-i", f"bench-site-{i}",
             "-q", "1", "-M", str(self.MAX_INFLIGHT), "-l", "-t", "edgeprune/pipeline/results/pi-b"],
            stdin=subprocess.PIPE) for i, port in enumerate(ports)]
        self.head, rest = result_template().split("RID")
        self.middle, self.tail = rest.split("1234.5")
        self.seq = 0

    def run(self, rate: float, seconds: float) -> float:
        """Publish at ``rate`` for ``seconds`` (in turn over the sites); returns the rate achieved."""
        start = time.monotonic()
        n0 = self.seq
        n_sites = len(self.clients)
        while (elapsed := time.monotonic() - start) < seconds:
            due = max(0, int(elapsed * rate) - (self.seq - n0))
            middle = f"{self.middle}{time.time()!r}{self.tail}\n"
            lines: list[list[str]] = [[] for _ in self.clients]
            for seq in range(self.seq, self.seq + due):
                lines[seq % n_sites].append(f"{self.head}s{seq % n_sites}-{seq}{middle}")
            self.seq += due
            for client, site_lines in zip(self.clients, lines):
                if site_lines and client.poll() is None:  # a client that is gone acknowledges none of its site's
                    try:
                        client.stdin.write("".join(site_lines).encode())
                        client.stdin.flush()
                    except BrokenPipeError:
                        pass
            time.sleep(0.005)
        return (self.seq - n0) / (time.monotonic() - start)

    def acknowledged(self, timeout_s: float = 60.0) -> int:
        """Results the site brokers acknowledged: each client, at the end of its input, publishes what is left and
        exits 0 once the last is acknowledged; a client that fails or hangs counts none of its site's."""
        deadline = time.monotonic() + timeout_s
        acknowledged = 0
        for i, client in enumerate(self.clients):
            try:
                client.stdin.close()
            except BrokenPipeError:
                pass
            try:
                ok = client.wait(max(0.1, deadline - time.monotonic())) == 0
            except subprocess.TimeoutExpired:
                ok = False
            acknowledged += len(range(i, self.seq, len(self.clients))) if ok else 0
        return acknowledged

    def close(self) -> None:
        for client in self.clients:
            if client.poll() is None:
                client.terminate()
            client.wait(30)


class Database:
    """One backend: how to query it, and how to make it unavailable and back."""

    def __init__(self, kind: str, workdir: Path):
        self.kind = kind
        self.server = None
        if kind == "postgresql":
            from edgeprune.pgserver import PostgresServer

            self.server = PostgresServer(durable=True)
            self.server.start()
            self.url = self.server.url
        else:
            self.url = str(workdir / "central.sqlite")
        self._lock: sqlite3.Connection | None = None

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.kind == "postgresql":
            import psycopg

            with psycopg.connect(self.url) as conn:
                return conn.execute(sql.replace("?", "%s"), params).fetchall()
        from gateway.store import connect_read_only

        with connect_read_only(self.url, timeout=30) as conn:
            return conn.execute(sql, params).fetchall()

    def pids(self) -> list[int]:
        """The server's processes (none for SQLite: its writes are the collector's own CPU)."""
        if self.server is None:
            return []
        try:
            postmaster = int((self.server.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [postmaster, *children(postmaster)]

    def count(self) -> int:
        try:
            return self.query("SELECT count(*) FROM requests")[0][0]
        except Exception:  # not created yet, or away
            return -1

    def go_away(self) -> None:
        if self.server is not None:
            self.server.stop()
        else:  # another writer holds the file: the collector's writes fail after sqlite3's 5 s busy wait
            self._lock = sqlite3.connect(self.url, isolation_level=None)
            self._lock.execute("BEGIN EXCLUSIVE")

    def come_back(self) -> None:
        if self.server is not None:
            self.server.start()
        else:
            self._lock.execute("ROLLBACK")
            self._lock.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Reads:
    """An ecologist's aggregate query every second, on its own connection, while the collector writes."""

    def __init__(self, db: Database):
        self.db = db
        self.stop = threading.Event()
        self.durations: list[float] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            t = time.monotonic()
            self.db.query(AGGREGATE, (time.time() - 3600,))
            self.durations.append(time.monotonic() - t)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(0.95 * len(ordered)) - 1))]


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """CPU seconds (user + system) the processes ``pids`` used so far, and seconds their threads spent runnable but
    waiting for a CPU (``schedstat``): taken at both ends of a phase, they say whether a part was busy or starved.
    Linux's /proc; a process that is gone counts nothing."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = waited = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{pid}/task").iterdir():
                waited += int((task / "schedstat").read_text().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return cpu, waited


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a PostgreSQL server's backends)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise RuntimeError(f"bench collect: {what} (after {timeout_s:.0f} s)")


class Cluster:
    """The run's brokers on loopback: a central one and ``n_sites`` bridged to it; logs and the collector's env."""

    def __init__(self, n_sites: int):
        from edgeprune.broker import free_port, start_broker
        from shared.settings import BrokerSettings, SiteSettings

        self.workdir = Path(tempfile.mkdtemp(prefix="edgeprune-bench-collect-"))
        self.logs: list = []
        self.central_settings = BrokerSettings(port=free_port(), data_dir=self.workdir / "central",
                                               allow_anonymous=True, max_queued_messages=CENTRAL_QUEUE)
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")},
                    "EDGEPRUNE_MQTT_PORT": str(self.central_settings.port), "EDGEPRUNE_MQTT_RECONNECT_MAX_S": "1",
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.central = start_broker(self.central_settings, log_file=self.log_file("central"))
        self.sites: list[subprocess.Popen] = []
        self.ports: list[int] = []
        try:
            for i in range(n_sites):
                port = free_port()
                self.ports.append(port)
                self.sites.append(start_broker(
                    BrokerSettings(port=port, data_dir=self.workdir / f"site-{i}", allow_anonymous=True,
                                   max_queued_messages=SITE_QUEUE),
                    log_file=self.log_file(f"site-{i}"),
                    site=SiteSettings(site_id=f"site-{i:02d}", central_port=self.central_settings.port,
                                      bridge_keepalive_s=5, bridge_restart_max_s=2)))
        except BaseException:
            self.close(finished=False)
            raise

    def log_file(self, name: str):
        self.logs.append(open(self.workdir / f"{name}.log", "w"))
        return self.logs[-1]

    def start_collector(self, db: Database, name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edgeprune", "collect", "--db", db.url], env=self.env,
                                cwd=self.workdir, stdout=self.log_file(name), stderr=subprocess.STDOUT)

    def parts(self, collector: subprocess.Popen, publisher: Publisher, db: Database) -> dict[str, list[int]]:
        """The processes of each part of the run, for :func:`cpu_times`."""
        return {"collector": [collector.pid], "central_broker": [self.central.pid],
                "site_brokers": [site.pid for site in self.sites],
                "publishers": [client.pid for client in publisher.clients], "bench": [os.getpid()],
                "database": db.pids()}

    def cut_bridges(self, cut_s: float, name: str) -> None:
        """The central broker away for ``cut_s``: every bridge is cut, then reconnects."""
        from edgeprune.broker import start_broker, stop_process

        stop_process(self.central)
        time.sleep(cut_s)
        self.central = start_broker(self.central_settings, log_file=self.log_file(name))

    def close(self, finished: bool) -> None:
        from edgeprune.broker import stop_process

        for proc in [*self.sites, self.central]:
            stop_process(proc)
        for f in self.logs:
            f.close()
        if finished:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"bench collect: the brokers' and collectors' logs are in {self.workdir}", file=sys.stderr)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cluster = Cluster(args.sites)
    backends: dict[str, dict] = {}
    finished = False
    try:
        for kind in [b.strip() for b in args.backends.split(",") if b.strip()]:
            backends[kind] = measure_backend(cluster, kind, args)
        finished = True
    finally:
        cluster.close(finished)
    flat = [{"backend": k, **{f: x for f, x in v.items() if not isinstance(x, dict)}} for k, v in backends.items()]
    return {"backends": backends, "tables": {"bench collect": flat},
            "config": {"sites": args.sites, "rate": args.rate, "seconds": args.seconds, "warmup_s": args.warmup_s,
                       "fault_rate": args.fault_rate, "cut_s": args.cut_s}}


def measure_backend(cluster: Cluster, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One backend through the four phases of the module's docstring: its row of the result."""
    from edgeprune.broker import stop_process

    db = Database(kind, cluster.workdir)
    publisher = Publisher(cluster.ports)
    collector = None
    try:
        collector = cluster.start_collector(db, f"collect-{kind}")
        wait_for(lambda: db.count() >= 0, 120, f"the collector never made its tables in {kind}")
        time.sleep(2.0)  # and subscribed (it makes its tables first)
        publisher.run(50, 2.0)  # the collector is subscribed and the bridges carry: a short first burst
        wait_for(lambda: db.count() >= publisher.seq, 120, f"the first results never reached {kind}")
        figures = {phase: steady_phase(db, publisher, args, reads=phase == "with_reads",
                                       parts=cluster.parts(collector, publisher, db))
                   for phase in ("sustained", "with_reads")}
        # drain: what the collector alone takes from a queue at the central broker
        stop_process(collector, timeout=30)
        before, queued_from = publisher.seq, time.time()
        publisher.run(args.rate, args.seconds)
        time.sleep(3.0)  # the bridges hand the last ones to the central broker
        collector = cluster.start_collector(db, f"collect-{kind}-drain")
        wait_for(lambda: db.count() >= publisher.seq, 600, f"{kind} never drained the queue")
        first, last = db.query("SELECT min(received_at), max(received_at) FROM requests WHERE "
                               "capture_ts >= ?", (queued_from,))[0]
        drain_rows_per_s = (publisher.seq - before) / (last - first)
        collector = through_faults(cluster, db, publisher, collector, args)
        accepted = publisher.acknowledged()
        wait_for(lambda: db.count() >= accepted, 600, f"{kind} never caught up after the faults")
        time.sleep(3.0)  # anything redelivered late would land now
        rows, distinct = db.query("SELECT count(*), count(DISTINCT site || '/' || request_id) "
                                  "FROM requests")[0]
        return {
            "rows_per_s": figures["sustained"]["rows_per_s"],
            "lag_p95_s": figures["sustained"]["lag_p95_s"],
            "lost": accepted - distinct, "duplicated": rows - distinct,
            "rows_per_s_with_reads": figures["with_reads"]["rows_per_s"],
            "rows_per_s_drain": drain_rows_per_s,
            "offered_per_s": figures["sustained"]["offered_per_s"],
            "offered_per_s_with_reads": figures["with_reads"]["offered_per_s"],
            "lag_p95_s_with_reads": figures["with_reads"]["lag_p95_s"],
            "read_p95_s": figures["with_reads"]["read_p95_s"],
            "collector_cpu_us_per_row": figures["sustained"]["collector_cpu_us_per_row"],
            "cpu_sustained": figures["sustained"]["cpu"], "cpu_with_reads": figures["with_reads"]["cpu"],
            "load_1min": os.getloadavg()[0],
            "published": publisher.seq, "acknowledged_by_sites": accepted,
        }
    finally:
        if collector is not None:
            stop_process(collector, timeout=30)
        publisher.close()
        db.close()


def steady_phase(db: Database, publisher: Publisher, args: argparse.Namespace, reads: bool,
                 parts: dict[str, list[int]]) -> dict[str, Any]:
    """``--seconds`` at ``--rate`` (with the aggregate query every second if ``reads``): rows/s, lag and each
    part's CPU (cores used, cores' worth of time its threads waited for a CPU) after ``--warmup-s``."""
    reader = Reads(db) if reads else None
    publisher.run(args.rate, args.warmup_s)
    start = time.time()
    before = {part: cpu_times(pids) for part, pids in parts.items()}
    offered = publisher.run(args.rate, args.seconds - args.warmup_s)
    after = {part: cpu_times(pids) for part, pids in parts.items()}
    t1 = time.time()
    if reader is not None:
        reader.close()
    wait_for(lambda: db.count() >= publisher.seq, 600,
             f"{db.kind} never caught up ({'with_reads' if reads else 'sustained'})")
    received = db.query("SELECT count(*) FROM requests WHERE received_at >= ? AND received_at < ?", (start, t1))[0][0]
    lags = [r[0] for r in db.query("SELECT received_at - capture_ts FROM requests WHERE "
                                   "capture_ts >= ? AND capture_ts < ?", (start, t1))]
    cpu = {part: {"cores": (after[part][0] - before[part][0]) / (t1 - start),
                  "waiting_for_cpu": (after[part][1] - before[part][1]) / (t1 - start)} for part in parts}
    return {"offered_per_s": offered, "rows_per_s": received / (t1 - start), "lag_p95_s": p95(lags),
            "read_p95_s": p95(reader.durations) if reader is not None else None, "cpu": cpu,
            "collector_cpu_us_per_row": 1e6 * cpu["collector"]["cores"] / max(received / (t1 - start), 1e-9)}


def through_faults(cluster: Cluster, db: Database, publisher: Publisher, collector: subprocess.Popen,
                   args: argparse.Namespace) -> subprocess.Popen:
    """Publishing at ``--fault-rate``: every bridge cut, then the database away with the collector killed and
    restarted; returns the restarted collector once the publishing is done."""
    done = threading.Event()
    thread = threading.Thread(target=lambda: (publisher.run(args.fault_rate, 4 * args.cut_s + 6), done.set()),
                              daemon=True)
    thread.start()
    time.sleep(1.0)
    cluster.cut_bridges(args.cut_s, f"central-{db.kind}")
    time.sleep(2.0)
    db.go_away()
    time.sleep(args.cut_s / 2)
    collector.send_signal(signal.SIGKILL)
    collector.wait(30)
    time.sleep(args.cut_s / 2)
    db.come_back()
    collector = cluster.start_collector(db, f"collect-{db.kind}-2")
    thread.join(600)
    return collector
