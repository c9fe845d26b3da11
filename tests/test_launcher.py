"""The one site launcher the demo, the soak and the decode benchmark start their processes through."""

from __future__ import annotations

import signal
import sys

from edgeprune import launcher
from edgeprune.launcher import SiteLauncher
from shared.settings import BrokerSettings


class FakeProcess:
    def __init__(self, argv, cwd, env, stdout, stderr, start_new_session):
        self.argv, self.cwd, self.env, self.session = argv, cwd, env, start_new_session
        self.signals: list[int] = []
        stdout.write(f"started {argv[-1]}\n")
        self.returncode = None

    def poll(self):
        return self.returncode

    def send_signal(self, sig):
        self.signals.append(sig)

    def wait(self):
        self.returncode = -9


def site(tmp_path, monkeypatch) -> SiteLauncher:
    broker = BrokerSettings(port=1, data_dir=tmp_path / "broker")
    made = SiteLauncher(tmp_path, broker, {"node-1": "node", "cam": "camera"}, {"A": "site", "B": "site"})
    monkeypatch.setattr(launcher.subprocess, "Popen", FakeProcess)  # after the logins: making them runs a tool
    return made


def test_a_child_runs_edgeprune_with_the_site_env_then_its_login_then_its_own(tmp_path, monkeypatch):
    s = site(tmp_path, monkeypatch)
    proc = s.start("node-1", ["node", "--node-id", "node-1"], env={"B": "own"})
    assert proc.argv == [sys.executable, "-m", "edgeprune", "node", "--node-id", "node-1"]
    assert proc.cwd == tmp_path and proc.session
    assert (proc.env["A"], proc.env["B"]) == ("site", "own")
    assert proc.env["EDGEPRUNE_MQTT_USERNAME"] == "node-1"
    assert s.start("camera", ["camera"], login="cam").env["EDGEPRUNE_MQTT_USERNAME"] == "cam"


def test_a_restart_repeats_the_command_with_the_site_env_of_now_and_appends_to_the_log(tmp_path, monkeypatch):
    s = site(tmp_path, monkeypatch)
    (tmp_path / "node-1.log").write_text("an earlier run's log\n")
    first = s.start("node-1", ["node", "--node-id", "node-1"])
    s.signal("node-1")
    assert first.signals == [signal.SIGKILL] and not s.running("node-1")
    s.env["A"] = "changed"
    again = s.restart("node-1")
    assert again.argv == first.argv and again.env["A"] == "changed" and s.running("node-1")
    assert (tmp_path / "node-1.log").read_text() == "started node-1\nstarted node-1\n"


def test_everything_stops_in_reverse_start_order_and_a_hung_process_is_woken_first(tmp_path, monkeypatch):
    s = site(tmp_path, monkeypatch)
    stopped = []
    monkeypatch.setattr(launcher, "stop_process", lambda proc: stopped.append(proc.argv[-1]))
    for name in ("gateway", "node-1", "camera"):
        s.start(name, [name], login="node-1")
    s.signal("node-1", signal.SIGSTOP)
    s.stop_all()
    assert stopped == ["camera", "node-1", "gateway"]
    assert s.procs["node-1"].signals == [signal.SIGSTOP, signal.SIGCONT]
