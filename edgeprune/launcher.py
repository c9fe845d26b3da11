"""One site's processes on this machine, by name: a Mosquitto from our template with a login per component, and
``edgeprune`` child processes (gateway, page, nodes, a camera) started, stopped, signalled and restarted.

``edgeprune demo``, the soak and the decode benchmark's pipeline each launch their site through
:class:`SiteLauncher`; which components they start, with which settings, and what faults they inject stay with them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from edgeprune.broker import start_broker, stop_process
from edgeprune.credentials import Credentials
from shared.settings import BrokerSettings

BROKER = "broker"
LOG_NAMES = {BROKER: "mosquitto"}  # the broker logs to mosquitto.log, every other process to <name>.log


class SiteLauncher:
    """The processes of one site, each logged to ``run_dir/<name>.log`` (fresh at its first start, appended to on
    restarts) and each child in a session of its own, so a terminal's Ctrl-C reaches only the launcher."""

    def __init__(self, run_dir: Path, broker: BrokerSettings, users: dict[str, str], env: dict[str, str],
                 topic_root: str = "edgeprune"):
        """``users``: login name -> role, made in the broker's credentials folder. ``env``: what every child runs
        with before its login and its own settings; read at each start, so a change reaches the next (re)start."""
        self.run_dir = run_dir
        self.broker_settings = broker
        self.credentials = Credentials(broker.credentials_folder, topic_root=topic_root)
        for name, role in users.items():
            self.credentials.add(name, role)
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}  # in start order; stopped in reverse
        self._commands: dict[str, tuple[list[str], str, dict[str, str]]] = {}
        self._logged: set[str] = set()

    @property
    def port(self) -> int:
        return self.broker_settings.port

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{LOG_NAMES.get(name, name)}.log"

    def _log(self, name: str):
        mode = "a" if name in self._logged else "w"
        self._logged.add(name)
        return open(self.log_path(name), mode)

    def start_broker(self) -> subprocess.Popen:
        """Mosquitto with the site's logins; returns once it accepts connections (also after :meth:`stop`)."""
        with self._log(BROKER) as log:
            proc = self.procs[BROKER] = start_broker(self.broker_settings, log_file=log)
        return proc

    def start(self, name: str, args: list[str], login: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """``edgeprune ARGS`` as component ``name``, logged in as ``login`` (default: ``name``), ``env`` over the
        site's."""
        self._commands[name] = (list(args), login or name, dict(env or {}))
        return self.restart(name)

    def restart(self, name: str) -> subprocess.Popen:
        """Start ``name`` again as it was last started (the broker: as :meth:`start_broker`)."""
        if name == BROKER:
            return self.start_broker()
        args, login, env = self._commands[name]
        with self._log(name) as log:
            proc = subprocess.Popen([sys.executable, "-m", "edgeprune", *args], cwd=self.run_dir,
                                    env={**self.env, **self.credentials.env(login), **env}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def running(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def signal(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: and reap it; SIGSTOP / SIGCONT: a hang and its end)."""
        self.procs[name].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait()

    def stop(self, name: str) -> None:
        """A clean stop (SIGTERM, SIGKILL if it hangs), also of a stopped (SIGSTOP) process."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            stop_process(proc)

    def stop_all(self) -> None:
        """Every process in reverse start order: the broker, started first, last."""
        for name in reversed(list(self.procs)):
            self.stop(name)
