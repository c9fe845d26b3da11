"""What `edgeprune demo` hands its children: the user's settings, with only what a local run must change."""

from __future__ import annotations

import pytest

from edgeprune.demo import DEMO_PROFILE, Demo, DemoOptions
from shared.settings import ControllerSettings, GatewaySettings, NodeSettings, load


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("EDGEPRUNE_")]:
        monkeypatch.delenv(key)


def child_settings(demo: Demo, monkeypatch, cls):
    """Load ``cls`` as a child process would, from the environment the demo gives it."""
    for key, value in demo.env().items():
        monkeypatch.setenv(key, value)
    return load(cls)


def test_user_environment_reaches_the_children(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CONTROLLER_POLICY", "paper")
    monkeypatch.setenv("EDGEPRUNE_GATEWAY_WINDOW_S", "5")
    monkeypatch.setenv("EDGEPRUNE_GATEWAY_NODES", "pi-a,pi-b,pi-c")  # the demo's own nodes must win
    demo = Demo(DemoOptions(run_dir=tmp_path, nodes=2))
    effective = demo.effective_settings()
    assert effective["controller.policy"] == "paper" and effective["gateway.window_s"] == 5.0
    assert child_settings(demo, monkeypatch, ControllerSettings).policy == "paper"
    gateway = child_settings(demo, monkeypatch, GatewaySettings)
    assert gateway.window_s == 5.0 and gateway.nodes == ["node-1", "node-2"]
    assert gateway.db_path == tmp_path.resolve() / "edgeprune.db"


def test_config_file_reaches_the_children_and_flags_beat_it(tmp_path, monkeypatch):
    config = tmp_path / "edgeprune.toml"
    config.write_text('[controller]\npolicy = "paper"\n[gateway]\nslo_s = 0.4\n[node]\nqueue_size = 4\n')
    demo = Demo(DemoOptions(run_dir=tmp_path / "run", config=config))
    assert demo.slo_s == 0.4  # the user's SLO, not the demo's 0.25
    assert child_settings(demo, monkeypatch, ControllerSettings).policy == "paper"
    assert child_settings(demo, monkeypatch, NodeSettings).queue_size == 4
    assert Demo(DemoOptions(run_dir=tmp_path / "run", config=config, slo_s=0.3)).slo_s == 0.3


def test_every_node_offers_the_shipped_profile_unless_told_to_measure(tmp_path, monkeypatch):
    assert DEMO_PROFILE.is_file()
    fixed = Demo(DemoOptions(run_dir=tmp_path))
    assert child_settings(fixed, monkeypatch, NodeSettings).profile == DEMO_PROFILE.resolve()
    measured = Demo(DemoOptions(run_dir=tmp_path, profile="measure"))
    assert child_settings(measured, monkeypatch, NodeSettings).profile is None


def test_demo_refuses_tls_its_own_broker_does_not_have(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_MQTT_TLS_CA", str(tmp_path / "ca.crt"))
    with pytest.raises(SystemExit, match="without TLS"):
        Demo(DemoOptions(run_dir=tmp_path))
