"""``edgeprune demo``: the whole pipeline on one machine, as real child processes.

mosquitto, the gateway, the operator page, N node agents and a camera, each the same
command a device would run, with the user's settings (environment and ``--config``) and
only what a local run must change on top: a free broker port, the run folder's database,
the node list. Every node offers the same fixed profile (the shipped one by default), so the
same command places the model the same way every time. A live line shows progress; Ctrl-C
or ``--duration`` stops everything in reverse order and prints the totals from the
gateway's SQLite log.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from edgeprune.broker import free_port, port_open
from edgeprune.credentials import default_users
from edgeprune.launcher import SiteLauncher
from gateway.store import Reader
from shared.bus import Bus
from shared.model import DEFAULT_CHECKPOINT
from shared.schemas import SlowdownCommand, to_json
from shared.settings import (ALL_SECTIONS, CONFIG_ENV, BrokerSettings, CameraSettings, GatewaySettings, MqttSettings,
                             NodeSettings, WebSettings, load, non_defaults)
from shared.topics import Topics

# The profile every demo node offers unless told otherwise (`edgeprune profile --repeats 100` on a
# 2-core x86 VM): one fixed file, so the planner splits the model the same way on every run and
# machine. The controller works from each node's live calibration, not from this file.
DEMO_PROFILE = DEFAULT_CHECKPOINT.with_name("trapnet.profile.json")
MEASURE = "measure"
# What the demo runs with unless the user sets it (flag, environment or config file).
DEMO_RATE_HZ = 4.0
DEMO_SLO_S = 0.25


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
    """What the demo command was asked; ``None`` = the user's setting, else the demo's choice."""

    run_dir: Path
    nodes: int = 2
    rate_hz: float | None = None
    duration_s: float = 0.0  # 0 = until Ctrl-C
    web_port: int | None = None
    slo_s: float | None = None
    profile: str | None = None  # a profile.json for every node, or "measure" (each node profiles itself)
    config: Path | None = None
    slowdowns: tuple[SlowdownEpisode, ...] = ()
    seed: int | None = None  # the camera's seed (frames and arrivals)
    # for benchmarks (edgeprune/bench/pipeline.py): extra settings for every component or per node,
    # the camera's own arguments instead of a Poisson rate, and no operator page
    env: dict[str, str] = field(default_factory=dict)
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    camera_args: tuple[str, ...] = ()
    web: bool = True
    node_ids: tuple[str, ...] = ()  # default node-1..node-N
    quiet: bool = False  # no live line (the caller shows its own progress)


def _chosen(flag: Any, settings, name: str, demo_default: Any) -> Any:
    """A flag wins; then whatever the user set (env or config file); then the demo's own default."""
    if flag is not None:
        return flag
    return getattr(settings, name) if name in settings.model_fields_set else demo_default


class Demo:
    def __init__(self, options: DemoOptions):
        self.opt = options
        self.run_dir = options.run_dir.resolve()
        self.site: SiteLauncher | None = None  # made once the broker's port is chosen (start_pipeline)
        self.bus: Bus | None = None
        self.frames_seen = 0
        self._stop = threading.Event()
        self.db = self.run_dir / "edgeprune.db"
        self.node_ids = list(options.node_ids) or [f"node-{i + 1}" for i in range(options.nodes)]
        config = options.config.resolve() if options.config else None
        self.config = config
        mqtt = load(MqttSettings, config)
        if mqtt.tls_ca:
            raise SystemExit("the demo runs its own local broker without TLS (it makes its own users): "
                             "unset [mqtt] tls_ca for it")
        node, camera = load(NodeSettings, config), load(CameraSettings, config)
        gateway, web = load(GatewaySettings, config), load(WebSettings, config)
        profile = _chosen(options.profile, node, "profile", DEMO_PROFILE)
        self.slo_s = float(_chosen(options.slo_s, gateway, "slo_s", DEMO_SLO_S))
        self.web_port = options.web_port if options.web_port is not None else web.port
        self.camera_id = camera.camera_id
        # what every child runs with on top of the user's settings (as env vars, which beat the config file)
        self.overrides: dict[type, dict[str, Any]] = {
            MqttSettings: {"host": "127.0.0.1"},
            GatewaySettings: {"db_path": self.db, "nodes": self.node_ids, "slo_s": self.slo_s},
            WebSettings: {"db_path": self.db, "port": self.web_port},
            NodeSettings: {"profile": None if str(profile) == MEASURE else Path(profile).resolve()},
            CameraSettings: {"rate_hz": _chosen(options.rate_hz, camera, "rate_hz", DEMO_RATE_HZ),
                             **({"seed": options.seed} if options.seed is not None else {})},
        }

    def effective_settings(self) -> dict[str, Any]:
        """Every setting the children run with that is not its default (node ids aside: one per node)."""
        changed: dict[str, Any] = {}
        for cls in ALL_SECTIONS:
            if cls is not BrokerSettings:  # the demo's broker is its own (see start)
                changed.update(non_defaults(load(cls, self.config).model_copy(update=self.overrides.get(cls, {}))))
        changed.pop("node.node_id", None)
        return changed

    def env(self) -> dict[str, str]:
        """The user's environment, the config file named, the demo's overrides, then a benchmark's own settings."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.config:
            env[CONFIG_ENV] = str(self.config)
        for cls, fields in self.overrides.items():
            for name, value in fields.items():
                shown = "" if value is None else ",".join(value) if isinstance(value, list) else str(value)
                env[f"{cls.model_config['env_prefix']}{name.upper()}"] = shown
        env.update(self.opt.env)
        return env

    def start(self) -> None:
        self.start_pipeline()
        self.start_camera()
        print(f"broker on 127.0.0.1:{self.port}; logs and database in {self.run_dir}")
        print(f"operator page: http://127.0.0.1:{self.web_port}/  (Ctrl-C stops the demo)", flush=True)

    def start_pipeline(self) -> None:
        """Broker, gateway, page and nodes; returns once every node has taken its stage."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.db.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.db}{suffix}").unlink(missing_ok=True)
        # Each demo starts from scratch, broker included: its persisted retained prune ratios would
        # otherwise replay the last demo's state (a node pruned at 0.4 before anything happened).
        shutil.rmtree(self.run_dir / "broker", ignore_errors=True)
        if self.opt.web and port_open("127.0.0.1", self.web_port):
            raise SystemExit(f"port {self.web_port} is busy: pass --web-port")
        port = self.port = free_port()
        self.overrides[MqttSettings]["port"] = port
        if not self.opt.quiet:
            print("settings (not at their defaults): "
                  + ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}"
                              for k, v in self.effective_settings().items()))
        broker = load(BrokerSettings, self.config).model_copy(
            update={"bind": "127.0.0.1", "port": port, "data_dir": self.run_dir / "broker"})
        # Each demo makes its own broker users (one per component, as install.sh does for a site).
        site = self.site = SiteLauncher(self.run_dir, broker, default_users(self.node_ids, [self.camera_id]),
                                        self.env())
        site.start_broker()
        site.start("gateway", ["gateway"])
        if self.opt.web:
            # the demo's page is on loopback: readable without a login; the controls need a password hash
            # (`edgeprune passwd`, then EDGEPRUNE_WEB_PASSWORD_HASH=... edgeprune demo)
            password = {k: v for k, v in os.environ.items() if k == "EDGEPRUNE_WEB_PASSWORD_HASH"}
            site.start("web", ["web"], env={"EDGEPRUNE_WEB_PUBLIC_STATUS": "true", "EDGEPRUNE_WEB_DEMO": "true",
                                            **password})
        for node_id in self.node_ids:
            site.start(node_id, ["node", "--node-id", node_id], env=self.opt.node_env.get(node_id, {}))
        mqtt = load(MqttSettings, self.config).model_copy(update={
            **self.overrides[MqttSettings], "username": "admin",
            "password": SecretStr(site.credentials.password("admin"))})
        self.topics = Topics(mqtt.topic_root)
        self.bus = Bus(mqtt, "demo", self.topics.component_status("demo"))
        self.bus.subscribe(self.topics.camera_frame_filter, self._count_frame)
        self.bus.start()
        self._wait_for_nodes()

    def start_camera(self) -> None:
        """The camera last, once every node has taken its stage, so no frame is lost at start.

        A benchmark's camera process stands for several cameras (bursts, a replayed trace), but a login
        is one device: it uses the operator's login, the demo's own camera its camera user.
        """
        user = "admin" if self.opt.camera_args else self.camera_id
        self.site.start("camera", ["camera", *self.opt.camera_args], login=user)

    def _count_frame(self, _topic: str, _payload: bytes, _props: dict[str, str]) -> None:
        """Frames as the broker delivers them on the cameras' topics: what entered the pipeline."""
        self.frames_seen += 1

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
        for name, proc in self.site.procs.items():
            if proc.poll() is not None and name != "camera":
                raise SystemExit(f"{name} exited with code {proc.returncode}; see {self.site.log_path(name)}")

    def progress_line(self) -> str:
        reader = Reader(self.db)
        run = reader.current_run()
        totals = reader.totals(run["slo_s"] if run else self.slo_s)
        if not totals["results"]:
            return "waiting for the first result…"
        nodes = " ".join(f"{n['node_id']}:q{n['queue_depth'] or 0},p{n['prune_ratio'] or 0:.1f}"
                         for n in reader.nodes())
        return (f"results {totals['results']:5d} | p50 {totals['p50_s'] * 1000:6.1f} ms | "
                f"p95 {totals['p95_s'] * 1000:6.1f} ms | SLO {totals['slo_s'] * 1000:.0f} ms met "
                f"{totals['attainment_pct']:5.1f} % | {nodes}")

    def _command(self, node_id: str, factor: float) -> None:
        """A one-shot `slowdown` command, as an operator's script would send it."""
        command = SlowdownCommand(cmd="slowdown", factor=factor)
        self.bus.publish(self.topics.node_command(node_id), to_json(command), qos=1).wait_for_publish(5)
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
        if self.site and self.site.running("camera"):
            self.site.stop("camera")
            time.sleep(1.5)
        if self.bus:
            self.bus.stop()
        if self.site:
            self.site.stop_all()

    def summary(self) -> dict:
        """Totals for the run: frames the broker delivered on the camera's topic, and what the gateway logged."""
        reader = Reader(self.db)
        run = reader.current_run()
        totals = reader.totals(run["slo_s"] if run else self.slo_s)
        return {"frames_sent": self.frames_seen, **totals,
                "windows": len(reader.windows(limit=100_000))}
