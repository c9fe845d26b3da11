"""`edgeprune doctor`: every check's failure path on hand-made facts, and the whole command on a real site."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.broker import free_port
from edgeprune.doctor import (FAIL, OK, WARNING, Facts, check_broker, gather, check_clock, check_disk, check_errors,
                              check_gateway, check_membership, check_memory, check_model, check_units, infer_role,
                              memory_available_mb, read_errors, report, run_checks)
from gateway.store import Store
from shared.schemas import Placement, StageAssignment
from tests.conftest import STARTUP_S, Processes, component_env, even_split, open_reader, wait_until

NOW = 1_000_000.0


def healthy(role: str = "node", **changes) -> Facts:
    """Facts of a working site, with ``changes`` applied."""
    placement = even_split(6, ["node-1", "node-2"])
    facts = Facts(role=role, now=NOW, broker="gw:1883", connected=True, gateway_status="online",
                  node_id="node-1" if role == "node" else None,
                  statuses={"node-1": "online", "node-2": "online"},
                  fingerprints={"node-1": "abc", "node-2": "abc"}, placement=placement,
                  configured_nodes=["node-1", "node-2"], local_fingerprint="abc", clock_offset_s=0.003,
                  max_clock_offset_s=0.05, disk_free_mb=20_000, min_free_mb=1024, memory_available_mb=2000,
                  units={"edgeprune-node": "active", "chrony": "active"}, errors=[])
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


@pytest.mark.parametrize("role", ["gateway", "node", "camera"])
def test_a_healthy_site_passes_every_check(role):
    checks = run_checks(healthy(role))
    assert [c.level for c in checks] == [OK] * len(checks), report(healthy(role), checks)


def test_broker_unreachable_or_refused():
    down = check_broker(healthy(connected=False))
    assert down.level == FAIL and "cannot reach" in down.message and "edgeprune-broker" in down.fix
    refused = check_broker(healthy(connected=False, refusal="Not authorized"))
    assert refused.level == FAIL and "Not authorized" in refused.message and "password" in refused.fix
    # everything that needs the broker is skipped, not failed a second time
    assert {c.level for c in (check_gateway(healthy(connected=False)), check_clock(healthy(connected=False)),
                              check_model(healthy(connected=False)))} == {WARNING}


def test_gateway_offline_or_never_seen():
    assert check_gateway(healthy(gateway_status="offline")).level == FAIL
    never = check_gateway(healthy(gateway_status=None))
    assert never.level == FAIL and "never connected" in never.message


def test_node_membership_failures():
    offline = check_membership(healthy(statuses={"node-2": "online"}))
    assert offline.level == FAIL and "not online" in offline.message
    no_profile = check_membership(healthy(fingerprints={"node-2": "abc"}))
    assert no_profile.level == FAIL and "profile" in no_profile.message
    spare = check_membership(healthy(placement=even_split(6, ["node-2"])))
    assert spare.level == WARNING and "[gateway] nodes" in spare.fix
    assert check_membership(healthy(placement=None)).level == WARNING
    ingesting = even_split(6, ["node-2"]).model_copy(update={"ingest_node": "node-1"})
    ingest = check_membership(healthy(placement=ingesting))
    assert ingest.level == OK and "ingest node" in ingest.message


def test_membership_names_every_node_of_a_replicated_stage_and_the_ingest_node():
    """A replica is placed (not a spare), and the gateway's summary lists every placed node."""
    placement = Placement(version=5, model="m", n_blocks=6, issued_at=NOW, ingest_node="node-3", share_token="t" * 12,
                          stages=[StageAssignment(stage=1, node_id="node-2", first_block=0, last_block=5,
                                                  replicas=["node-1"])])
    replica = check_membership(healthy(placement=placement))
    assert replica.level == OK and "stage 1 (blocks 0–5, shared with node-2 (replicas))" in replica.message
    summary = check_membership(healthy("gateway", placement=placement))
    assert summary.level == OK and "v5: ingest node-3 → stage 1 on node-2 + node-1" in summary.message


def test_gateway_membership_failures():
    assert check_membership(healthy("gateway", placement=None)).level == FAIL
    missing = check_membership(healthy("gateway", statuses={"node-1": "online", "node-2": "offline"}))
    assert missing.level == WARNING and "node-2" in missing.message


def test_clock_offset():
    assert check_clock(healthy(clock_offset_s=None)).level == WARNING
    off = check_clock(healthy(clock_offset_s=-0.4))
    assert off.level == FAIL and "-400 ms" in off.message and "chronyc" in off.fix
    assert check_clock(healthy("gateway", clock_offset_s=None)).level == OK  # the gateway is the clock


def test_model_fingerprints():
    odd = check_model(healthy(fingerprints={"node-1": "abc", "node-2": "zzz"}))
    assert odd.level == FAIL and "node-2" in odd.message and "checkpoint" in odd.fix
    this_one = check_model(healthy(local_fingerprint="zzz"))
    assert this_one.level == FAIL and "this device" in this_one.message
    assert check_model(healthy(fingerprints={}, local_fingerprint=None)).level == WARNING


def test_disk_and_memory():
    assert check_disk(healthy(disk_free_mb=500)).level == FAIL
    assert check_disk(healthy(disk_free_mb=1500)).level == WARNING
    assert check_memory(healthy(memory_available_mb=100)).level == FAIL
    assert check_memory(healthy(memory_available_mb=250)).level == WARNING
    assert check_memory(healthy(memory_available_mb=None)).level == WARNING


def test_memory_available_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  4000000 kB\nMemAvailable:  2048000 kB\n")
    assert memory_available_mb(meminfo) == 2000
    assert memory_available_mb(tmp_path / "missing") is None


def test_services():
    down = check_units(healthy(units={"edgeprune-node": "failed", "chrony": "active"}))
    assert down.level == FAIL and "edgeprune-node failed" in down.message and "restart edgeprune-node" in down.fix
    assert check_units(healthy(units=None)).level == WARNING


def test_error_records_on_the_gateway():
    assert check_errors(healthy("gateway", errors=None)).level == WARNING
    recent = [{"ts": NOW - 60, "component": "node-2", "kind": "bad_frame", "message": "not an image"}]
    flagged = check_errors(healthy("gateway", errors=recent))
    assert flagged.level == WARNING and "node-2" in flagged.message and "bad_frame" in flagged.message
    old = [{"ts": NOW - 7200, "component": "node-2", "kind": "bad_frame", "message": "x"}]
    assert check_errors(healthy("gateway", errors=old)).level == OK


def test_error_records_are_read_newest_first_and_none_without_a_gateway_database(tmp_path):
    assert read_errors(tmp_path / "missing.db") is None
    (tmp_path / "garbage.db").write_text("not a database")
    assert read_errors(tmp_path / "garbage.db") is None
    store = Store(tmp_path / "g.db")
    for ts in (3.0, 1.0, 2.0):
        store.add_error({"ts": ts, "component": "node-2", "topic": "t", "kind": "bad_frame", "message": "m"})
    store.close()
    assert [e["ts"] for e in read_errors(tmp_path / "g.db", limit=2)] == [3.0, 2.0]
    assert not (tmp_path / "missing.db").exists()


def test_role_from_installed_units():
    assert infer_role(["edgeprune-broker.service", "edgeprune-gateway.service"]) == "gateway"
    assert infer_role(["edgeprune-node.service"]) == "node"
    assert infer_role([]) is None


def test_report_prints_the_fix_of_each_problem():
    facts = healthy(gateway_status="offline")
    text = report(facts, run_checks(facts))
    assert "FAIL" in text and "fix: on the gateway" in text and "1 fail" in text


# --- the command on a real broker, gateway and node --------------------------------------------
@pytest.mark.integration
def test_doctor_on_a_running_site(broker, tmp_path, monkeypatch):
    db = tmp_path / "edgeprune.db"
    profile = Path(__file__).resolve().parents[1] / "shared" / "assets" / "trapnet.profile.json"
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1",
                        EDGEPRUNE_GATEWAY_CLOCK_BEACON_S="0.5", EDGEPRUNE_GATEWAY_MIN_FREE_MB="1",
                        EDGEPRUNE_GATEWAY_MAX_CLOCK_OFFSET_S="5", EDGEPRUNE_NODE_NODE_ID="node-1",
                        EDGEPRUNE_NODE_PROFILE=str(profile), EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5")
    for key in ("EDGEPRUNE_GATEWAY_DB_PATH", "EDGEPRUNE_GATEWAY_NODES", "EDGEPRUNE_GATEWAY_CLOCK_BEACON_S",
                "EDGEPRUNE_NODE_NODE_ID", "EDGEPRUNE_NODE_PROFILE"):
        monkeypatch.setenv(key, env[key])
    no_file = tmp_path / "empty.toml"  # settings from env only, even where /etc/edgeprune/edgeprune.toml exists
    no_file.write_text("")

    def doctor(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edgeprune", "doctor", "--config", str(no_file), *args],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finished(proc: subprocess.Popen) -> tuple[int, str]:
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out + err

    # needs nothing of the site: runs while it starts (it waits seconds for a broker that never answers)
    unreachable = doctor("--role", "camera", "--port", str(free_port()))
    procs = Processes(tmp_path, env)
    procs.start("gateway", "gateway")
    procs.start("node-1", "node")
    try:
        reader = open_reader(db)
        wait_until(lambda: any(n["stage"] == 1 for n in reader.nodes()), STARTUP_S, "node-1 did not take its stage")
        wait_until(lambda: any(n.get("clock_offset_s") is not None for n in reader.nodes()), 30,
                   "node-1 never reported a clock offset in its stats")

        # both views gathered in this process (torch is loaded already: no second interpreter start), one after
        # the other (each connects as doctor-<host>: a second one would end the first one's session); the command
        # itself, its report and exit status, is the unreachable run's
        node = gather("node", None, broker)
        checks = run_checks(node)
        shown = report(node, checks)
        for name in ("broker", "gateway", "membership", "clock", "model"):
            assert f"ok       {name}" in shown, shown
        assert "node-1 runs stage 1" in shown and not any(c.level == FAIL for c in checks), shown

        gateway = gather("gateway", None, broker)
        checks = {c.name: c for c in run_checks(gateway)}
        shown = report(gateway, list(checks.values()))
        assert checks["membership"].message.startswith("all 1 configured nodes online"), shown
        assert checks["errors"].level in (OK, WARNING) and gateway.errors is not None

        code, shown = finished(unreachable)
        assert code == 1 and "FAIL     broker" in shown, shown
    finally:
        procs.stop_all()
        if unreachable.poll() is None:
            unreachable.kill()
