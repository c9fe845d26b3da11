"""``edgeprune demo``: the whole pipeline on one machine, as real child processes.

mosquitto, the gateway, the operator page, N node agents and a camera, each the same
command a device would run, wired by environment variables to a free broker port and a
run folder. A live line shows progress; Ctrl-C or ``--duration`` stops everything in
reverse order and prints the totals from the gateway's SQLite log.
"""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeprune.broker import free_port, port_open, start_broker, stop_process
from gateway.store import Reader
from shared.settings import BrokerSettings
from shared.topics import Topics


@dataclass(frozen=True)
class SlowdownEpisode:
    """Emulate a busy node for a while: what pruning is for."""

    node_id: str
    factor: float
    start_s: float
    end_s: float

    @classmethod
    def parse(cls, text: str) -> SlowdownEpisode:
        """``NODE:FACTOR:START:END`` (seconds since the camera started), e.g. ``node-1:20:30:90``."""
        try:
            node, factor, start, end = text.split(":")
            episode = cls(node, float(factor), float(start), float(end))
        except ValueError:
            raise ValueError(f"--slowdown {text!r}: expected NODE:FACTOR:START:END, e.g. node-1:20:30:90") from None
        if episode.factor < 1 or not 0 <= episode.start_s < episode.end_s:
            raise ValueError(f"--slowdown {text!r}: factor must be >= 1 and 0 <= START < END")
        return episode


@dataclass
class DemoOptions:
    run_dir: Path
    nodes: int = 2
    rate_hz: float = 4.0
    duration_s: float = 0.0  # 0 = until Ctrl-C
    web_port: int = 8080
    slo_s: float = 0.25
    seed: int = 0
    slowdowns: tuple[SlowdownEpisode, ...] = ()
    # for benchmarks (edgeprune/bench/pipeline.py): extra settings for every component or per node,
    # the camera's own arguments instead of a Poisson rate, and no operator page
    env: dict[str, str] = field(default_factory=dict)
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    camera_args: tuple[str, ...] = ()
    web: bool = True
    node_ids: tuple[str, ...] = ()  # default node-1..node-N
    quiet: bool = False  # no live line (the caller shows its own progress)


class Demo:
    def __init__(self, options: DemoOptions):
        self.opt = options
        self.run_dir = options.run_dir.resolve()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.broker: subprocess.Popen | None = None
        self._stop = threading.Event()
        self.db = self.run_dir / "edgeprune.db"
        self.node_ids = list(options.node_ids) or [f"node-{i + 1}" for i in range(options.nodes)]

    def env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")}
        env.update({
            "EDGEPRUNE_MQTT_PORT": str(port), "PYTHONUNBUFFERED": "1",
            "EDGEPRUNE_GATEWAY_DB_PATH": str(self.db), "EDGEPRUNE_GATEWAY_NODES": ",".join(self.node_ids),
            "EDGEPRUNE_GATEWAY_SLO_S": str(self.opt.slo_s), "EDGEPRUNE_WEB_DB_PATH": str(self.db),
            "EDGEPRUNE_WEB_PORT": str(self.opt.web_port),
        })
        env.update(self.opt.env)
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.run_dir / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "edgeprune", *args], env=env, cwd=self.run_dir,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self) -> None:
        self.start_pipeline()
        self.start_camera()
        print(f"broker on 127.0.0.1:{self.port}; logs and database in {self.run_dir}")
        print(f"operator page: http://127.0.0.1:{self.opt.web_port}/  (Ctrl-C stops the demo)", flush=True)

    def start_pipeline(self) -> None:
        """Broker, gateway, page and nodes; returns once every node has taken its stage."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.db.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.db}{suffix}").unlink(missing_ok=True)
        # Each demo starts from scratch, broker included: its persisted retained prune ratios would
        # otherwise replay the last demo's state (a node pruned at 0.4 before anything happened).
        shutil.rmtree(self.run_dir / "broker", ignore_errors=True)
        if self.opt.web and port_open("127.0.0.1", self.opt.web_port):
            raise SystemExit(f"port {self.opt.web_port} is busy: pass --web-port")
        port = self.port = free_port()
        with open(self.run_dir / "mosquitto.log", "w") as log:
            self.broker = start_broker(BrokerSettings(port=port, data_dir=self.run_dir / "broker"), log_file=log)
        env = self.env(port)
        self.spawn("gateway", ["gateway"], env)
        if self.opt.web:
            self.spawn("web", ["web"], env)
        for node_id in self.node_ids:
            self.spawn(node_id, ["node", "--node-id", node_id], {**env, **self.opt.node_env.get(node_id, {})})
        self._wait_for_nodes()

    def start_camera(self) -> None:
        self.spawn("camera", ["camera", *(self.opt.camera_args or ("--camera-id", "cam-1", "--rate",
                                                                    str(self.opt.rate_hz))),
                              "--seed", str(self.opt.seed)], self.env(self.port))

    def _wait_for_nodes(self, timeout_s: float = 90.0) -> None:
        """Start the camera only once every node has taken its stage, so no frame is lost at start."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                staged = {n["node_id"] for n in Reader(self.db).nodes() if n.get("stage")}
            except FileNotFoundError:  # the gateway is still creating its database
                staged = set()
            if staged >= set(self.node_ids):
                return
            time.sleep(0.3)
        raise SystemExit(f"nodes did not take their stages within {timeout_s:.0f} s; see {self.run_dir}/*.log")

    def _check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None and name != "camera":
                raise SystemExit(f"{name} exited with code {proc.returncode}; see {self.run_dir / (name + '.log')}")

    def progress_line(self) -> str:
        reader = Reader(self.db)
        run = reader.current_run()
        totals = reader.totals(run["slo_s"] if run else self.opt.slo_s)
        if not totals["results"]:
            return "waiting for the first result…"
        nodes = " ".join(f"{n['node_id']}:q{n['queue_depth'] or 0},p{n['prune_ratio'] or 0:.1f}"
                         for n in reader.nodes())
        return (f"results {totals['results']:5d} | p50 {totals['p50_s'] * 1000:6.1f} ms | "
                f"p95 {totals['p95_s'] * 1000:6.1f} ms | SLO {totals['slo_s'] * 1000:.0f} ms met "
                f"{totals['attainment_pct']:5.1f} % | {nodes}")

    def _command(self, node_id: str, factor: float) -> None:
        """A one-shot `slowdown` command, as an operator's script would send it."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        payload = json.dumps({"cmd": "slowdown", "factor": factor})
        client.publish(Topics().node_command(node_id), payload, qos=1).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()
        if not self.opt.quiet:
            print(f"\n{node_id}: emulated slowdown {factor:g}x", flush=True)

    def _apply_episodes(self, elapsed: float, applied: set) -> None:
        for episode in self.opt.slowdowns:
            for edge, at, factor in (("start", episode.start_s, episode.factor), ("end", episode.end_s, 1.0)):
                if elapsed >= at and (episode, edge) not in applied:
                    applied.add((episode, edge))
                    self._command(episode.node_id, factor)

    def run(self, on_second=None) -> dict:
        """Until ``duration_s`` or Ctrl-C, applying the slowdown schedule; ``on_second(elapsed)`` replaces the
        live line (a benchmark's progress bar)."""
        started = time.monotonic()
        applied: set = set()
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            while not self._stop.wait(1.0):
                self._check_alive()
                self._apply_episodes(time.monotonic() - started, applied)
                if on_second is not None:
                    on_second(time.monotonic() - started)
                elif not self.opt.quiet:
                    print("\r" + self.progress_line().ljust(100), end="", flush=True)
                if self.opt.duration_s and time.monotonic() - started >= self.opt.duration_s:
                    break
        except KeyboardInterrupt:
            pass
        print()
        return self.stop()

    def stop(self) -> dict:
        self.stop_processes()
        return self.summary()

    def stop_processes(self) -> None:
        """Camera first, then let the pipeline drain, then the rest, the broker last."""
        for name, proc in self.procs:
            if name == "camera" and proc.poll() is None:
                stop_process(proc)
                time.sleep(1.5)
        for _, proc in reversed(self.procs):
            stop_process(proc)
        if self.broker:
            stop_process(self.broker)

    def summary(self) -> dict:
        """Totals for the run: frames the camera reports sent, and what the gateway logged."""
        match = re.search(r"sent (\d+) frames", (self.run_dir / "camera.log").read_text())
        reader = Reader(self.db)
        run = reader.current_run()
        totals = reader.totals(run["slo_s"] if run else self.opt.slo_s)
        return {"frames_sent": int(match.group(1)) if match else None, **totals,
                "windows": len(reader.windows(limit=100_000))}
