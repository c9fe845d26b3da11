"""Offline installation: a bundle made here installs with no registry and runs a frame; wheel tags are checked."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import Processes, component_env, open_reader, wait_until

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_SH = ROOT / "packaging" / "bundle.sh"


def bundle_function(call: str, **env: str) -> subprocess.CompletedProcess:
    script = f'set -euo pipefail; SUDO=""; HERE="{ROOT}"; say() {{ echo "==> $*"; }}; . "{BUNDLE_SH}"; {call}'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_wheel_tags_are_checked_for_the_target(tmp_path):
    for name in ("numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
                 "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_aarch64.whl", "flask-3.1.3-py3-none-any.whl",
                 "pydantic_core-2.50.5-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.whl",
                 "cryptography-46.0.0-cp39-abi3-manylinux_2_34_aarch64.whl"):
        (tmp_path / name).touch()
    ok = bundle_function(f'verify_bundle_wheels "{tmp_path}" aarch64 3.11')
    assert ok.returncode == 0 and "all 5 wheels fit aarch64" in ok.stdout, ok.stderr
    assert bundle_function(f'verify_bundle_wheels "{tmp_path}" x86_64 3.11').returncode != 0
    assert bundle_function(f'verify_bundle_wheels "{tmp_path}" aarch64 3.12').returncode != 0
    for wrong in ("scipy-1.17.1-cp311-cp311-manylinux_2_27_x86_64.whl",
                  "nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_aarch64.whl"):
        (tmp_path / wrong).touch()
        refused = bundle_function(f'verify_bundle_wheels "{tmp_path}" aarch64 3.11')
        assert refused.returncode != 0 and wrong in refused.stderr
        (tmp_path / wrong).unlink()


def test_torch_spec_is_the_cpu_build():
    assert bundle_function("torch_spec_for", TORCH_SPEC="torch==2.13.0").stdout.strip() == "torch==2.13.0+cpu"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bundle_installs_offline_and_classifies_a_frame(broker, tmp_path):
    """The field path end to end: make a bundle (registries allowed), unpack the source it carries, install
    from it into a fresh venv with every registry and proxy pointing nowhere, then run one frame."""
    bundle = tmp_path / "bundle"
    # EDGEPRUNE_TORCH_INDEX empty: pip's own configuration says where the CPU torch wheel is (here a local file)
    made = subprocess.run([str(ROOT / "install.sh"), "--make-bundle", str(bundle)], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "EDGEPRUNE_TORCH_INDEX": ""})
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    wheels = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    assert any(w.startswith("torch-2.13.0+cpu-") for w in wheels) and any(w.startswith("animal_mnist") for w in wheels)
    debs = sorted(p.name for p in (bundle / "debs").glob("*.deb"))
    assert any(d.startswith("mosquitto_") for d in debs) and any(d.startswith("chrony_") for d in debs)
    missing = bundle_function(f'debs_to_install "{bundle / "debs"}"').stdout.split()
    assert missing and len(missing) < len(debs)  # what this machine already has is not installed again

    source = tmp_path / "site"
    with tarfile.open(bundle / "edgeprune-src.tar.gz") as tar:
        tar.extractall(source, filter="data")
    venv = tmp_path / "venv"
    offline = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHONPATH", "EDGEPRUNE_"))}
    offline.update({"EDGEPRUNE_VENV": str(venv), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                    "PIP_EXTRA_INDEX_URL": "", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"})
    installed = subprocess.run([str(source / "install.sh"), "--from-bundle", str(bundle), "--role", "gateway",
                                "--no-apt"], capture_output=True, text=True, timeout=1800, env=offline)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    python = str(venv / "bin" / "python")
    torch_version = subprocess.run([python, "-c", "import torch, animal_mnist; print(torch.__version__)"],
                                   capture_output=True, text=True, env=offline, cwd=tmp_path)
    assert torch_version.stdout.strip() == "2.13.0+cpu", torch_version.stderr

    db = tmp_path / "edgeprune.db"
    env = {k: v for k, v in component_env(broker).items() if k != "PYTHONPATH"}
    env.update({"EDGEPRUNE_GATEWAY_DB_PATH": str(db), "EDGEPRUNE_GATEWAY_NODES": "node-1",
                "EDGEPRUNE_NODE_PROFILE": str(source / "shared" / "assets" / "trapnet.profile.json")})
    procs = Processes(tmp_path, env, python=python)
    procs.start("gateway", "gateway")
    procs.start("node-1", "node", "--node-id", "node-1")
    try:
        reader = open_reader(db)
        wait_until(lambda: any(n["stage"] == 1 for n in reader.nodes()), 120, "node-1 did not take its stage")
        procs.start("camera", "camera", extra_env={"EDGEPRUNE_CAMERA_COUNT": "1"})
        wait_until(lambda: reader.totals(0.5)["results"] == 1, 120, "the frame was not classified")
    finally:
        procs.stop_all()
    assert "site" in subprocess.run([python, "-c", "import edgeprune; print(edgeprune.__file__)"],
                                    capture_output=True, text=True, env=env, cwd=tmp_path).stdout
