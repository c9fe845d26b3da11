"""Configuration: env vars, the TOML file, and one-line errors naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.settings import GatewaySettings, NodeSettings, SettingsError, describe, load


def test_defaults_env_and_file_priority(tmp_path, monkeypatch):
    conf = tmp_path / "edgeprune.toml"
    conf.write_text('[node]\nnode_id = "pi-a"\nqueue_size = 4\n[gateway]\nnodes = ["pi-a", "pi-b"]\n')
    monkeypatch.setenv("EDGEPRUNE_NODE_QUEUE_SIZE", "9")
    node = load(NodeSettings, conf)
    assert (node.node_id, node.queue_size) == ("pi-a", 9)  # env beats file
    assert load(NodeSettings, conf, queue_size=3).queue_size == 3  # flag beats env
    assert load(GatewaySettings, conf).nodes == ["pi-a", "pi-b"]


def test_comma_separated_nodes_from_env(monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_GATEWAY_NODES", "a, b,c")
    assert load(GatewaySettings).nodes == ["a", "b", "c"]


@pytest.mark.parametrize("cls,env,value,field", [
    (NodeSettings, "EDGEPRUNE_NODE_QUEUE_SIZE", "0", "node.queue_size"),
    (NodeSettings, "EDGEPRUNE_NODE_NODE_ID", "a/b", "node.node_id"),
    (GatewaySettings, "EDGEPRUNE_GATEWAY_SLO_S", "-1", "gateway.slo_s"),
    (GatewaySettings, "EDGEPRUNE_GATEWAY_NODES", "a,a", "gateway.nodes"),
])
def test_invalid_values_name_the_field(monkeypatch, cls, env, value, field):
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as err:
        load(cls)
    assert field in str(err.value) and env in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file_is_an_error(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("[node]\nqueue_sise = 4\n")
    with pytest.raises(SettingsError, match="node.queue_sise"):
        load(NodeSettings, conf)


def test_cli_reports_invalid_setting_in_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "node", "--queue-size", "0"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "node.queue_size" in lines[0] and "Traceback" not in proc.stderr


def test_describe_lists_every_field():
    text = describe()
    for name in NodeSettings.model_fields:
        assert f"`{name}`" in text
