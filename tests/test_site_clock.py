"""install.sh's site clock (packaging/site-clock.sh): the chrony drop-ins per role, run on temp files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "packaging" / "site-clock.sh"
DEBIAN_CHRONY_CONF = "pool 2.debian.pool.ntp.org iburst\nsourcedir /run/chrony-dhcp\nconfdir /etc/chrony/conf.d\n"


def run(tmp_path: Path, call: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "EDGEPRUNE_CHRONY_DROPIN": str(tmp_path / "conf.d" / "edgeprune.conf"),
           "EDGEPRUNE_CHRONY_MAIN": str(tmp_path / "chrony.conf")}
    script = f'SUDO=""; say() {{ echo "$*"; }}; . "{SCRIPT}"; {call}'
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_gateway_serves_the_site_with_a_local_stratum(tmp_path):
    assert run(tmp_path, "configure_site_clock gateway").returncode == 0
    conf = (tmp_path / "conf.d" / "edgeprune.conf").read_text()
    assert "allow 192.168.0.0/16" in conf and "local stratum 10" in conf


def test_node_follows_only_the_gateway_and_uninstall_restores(tmp_path):
    (tmp_path / "chrony.conf").write_text(DEBIAN_CHRONY_CONF)
    done = run(tmp_path, "configure_site_clock node 192.168.50.1")
    assert done.returncode == 0, done.stderr
    assert "server 192.168.50.1 iburst" in (tmp_path / "conf.d" / "edgeprune.conf").read_text()
    assert "\npool " not in "\n" + (tmp_path / "chrony.conf").read_text()
    assert run(tmp_path, "remove_site_clock").returncode == 0
    assert (tmp_path / "chrony.conf").read_text() == DEBIAN_CHRONY_CONF
    assert not (tmp_path / "conf.d" / "edgeprune.conf").exists()


def test_node_reads_the_gateway_address_from_the_config_or_refuses_loopback(tmp_path):
    config = tmp_path / "edgeprune.toml"
    config.write_text('[mqtt]\nhost = "10.1.2.3"\n')
    assert run(tmp_path, f'gateway_address_from_config "{config}"').stdout.strip() == "10.1.2.3"
    refused = run(tmp_path, "configure_site_clock camera 127.0.0.1")
    assert refused.returncode == 2 and "--gateway-address" in refused.stderr


@pytest.mark.skipif(shutil.which("chronyd") is None, reason="chrony is not installed (install.sh --role … --systemd)")
@pytest.mark.parametrize("call", ["chrony_gateway_conf", "chrony_client_conf 192.168.50.1"])
def test_chronyd_accepts_the_drop_ins(tmp_path, call):
    conf = tmp_path / "c.conf"
    conf.write_text(run(tmp_path, call).stdout)
    parsed = subprocess.run([shutil.which("chronyd"), "-p", "-f", str(conf)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
