"""install.sh's systemd units (packaging/services.sh): hardened, verified by systemd, removed cleanly."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # its bin/edgeprune exists, as on a device
ANALYZE = shutil.which("systemd-analyze")


def services(call: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEPRUNE_UNIT_DIR": str(tmp_path / "units"), "EDGEPRUNE_DATA_DIR": str(tmp_path / "data"),
           "EDGEPRUNE_CONFIG_DIR": str(tmp_path / "etc"),
           "EDGEPRUNE_CHRONY_DROPIN": str(tmp_path / "chrony" / "edgeprune.conf"),
           "EDGEPRUNE_CHRONY_MAIN": str(tmp_path / "chrony" / "chrony.conf")}
    script = (f'set -euo pipefail; SUDO=""; HERE="{ROOT}"; VENV="{VENV}"; say() {{ echo "==> $*"; }}; '
              f'. "{ROOT}/packaging/site-clock.sh"; . "{ROOT}/packaging/services.sh"; {call}')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def units(tmp_path) -> dict[str, Path]:
    (tmp_path / "units").mkdir()
    written = {}
    for svc in ("broker", "gateway", "web", "node", "camera", "collect"):
        unit = tmp_path / "units" / f"edgeprune-{svc}.service"
        unit.write_text(services(f"render_unit {svc} network-online.target", tmp_path).stdout)
        written[svc] = unit
    return written


def test_no_unit_runs_as_root_and_only_the_data_directory_is_writable(units):
    for unit in units.values():
        text = unit.read_text()
        assert "User=edgeprune" in text and "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text
        assert "PrivateTmp=yes" in text and re.search(r"^(StateDirectory|ReadWritePaths)=\S+", text, re.M)
        assert f"ExecStart={VENV}/bin/edgeprune " in text


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)")
def test_units_pass_systemd_verify_and_score_low_exposure(units):
    verified = subprocess.run([ANALYZE, "verify", *map(str, units.values())], capture_output=True, text=True)
    assert verified.returncode == 0 and "edgeprune-" not in verified.stderr, verified.stderr  # no warning either
    for unit in units.values():
        out = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True)
        score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout).group(1))
        assert score <= 2.0, out.stdout[-2000:]  # 10 is fully exposed; the unhardened units scored 9.6


def test_uninstall_keeps_the_data_unless_purged(tmp_path):
    for d in ("units", "data", "etc", "chrony"):
        (tmp_path / d).mkdir()
    (tmp_path / "data" / "edgeprune.db").write_text("x")
    (tmp_path / "etc" / "edgeprune.toml").write_text("[mqtt]\n")
    for svc in ("broker", "gateway", "web", "node"):
        (tmp_path / "units" / f"edgeprune-{svc}.service").write_text("[Unit]\n")
    kept = services("uninstall_role gateway 0", tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert [p.name for p in (tmp_path / "units").iterdir()] == ["edgeprune-node.service"]
    assert "keeping user edgeprune" in kept.stdout  # the node unit still needs it
    assert (tmp_path / "data" / "edgeprune.db").exists() and (tmp_path / "etc" / "edgeprune.toml").exists()
    purged = services("uninstall_role node 1", tmp_path)
    assert purged.returncode == 0, purged.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "etc").exists()
    assert not list((tmp_path / "units").iterdir())


def test_central_role_runs_its_broker_and_the_collector(tmp_path):
    (tmp_path / "units").mkdir()
    assert services("services_for central", tmp_path).stdout.split() == ["broker", "collect"]
    removed = services("uninstall_role central 0", tmp_path)
    assert removed.returncode == 0 and "edgeprune-collect.service" in removed.stdout, removed.stderr


def test_install_sh_knows_the_central_role_and_refuses_an_unknown_one():
    usage = subprocess.run(["bash", str(ROOT / "install.sh"), "--help"], capture_output=True, text=True, timeout=60)
    assert "--role gateway|node|camera|all|central" in usage.stdout and "--sites LIST" in usage.stdout
    refused = subprocess.run(["bash", str(ROOT / "install.sh"), "--role", "centre"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "all or central" in refused.stderr
