"""Start a real Mosquitto from our template: used by `edgeprune broker`, the demo and the tests."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from shared.settings import BrokerSettings, SiteSettings
from shared.topics import Topics

TEMPLATE = Path(__file__).resolve().parents[1] / "mosquitto" / "mosquitto.conf.template"
BRIDGE_TEMPLATE = TEMPLATE.with_name("bridge.conf.template")


class BrokerError(RuntimeError):
    pass


def render_config(settings: BrokerSettings, site: SiteSettings | None = None, topic_root: str = "edgeprune") -> str:
    data_dir = settings.data_dir.resolve()
    config = TEMPLATE.read_text().format(
        user=getpass.getuser(), port=settings.port, bind=settings.bind, data_dir=data_dir,
        max_packet_size=settings.max_packet_size, max_queued_messages=settings.max_queued_messages,
        auth=_auth_lines(settings), tls_listener=_tls_lines(settings))
    if site is not None and site.site_id:
        config += render_bridge(site, Topics(topic_root))
    return config


def _auth_lines(settings: BrokerSettings) -> str:
    if settings.allow_anonymous:
        return "allow_anonymous true"
    folder = settings.credentials_folder.resolve()
    return f"allow_anonymous false\npassword_file {folder / 'passwd'}\nacl_file {folder / 'acl'}"


def _tls_lines(settings: BrokerSettings) -> str:
    if settings.tls_port is None:
        return ""
    if settings.tls_dir is None:
        raise BrokerError("broker tls_port is set but tls_dir is not (ca.crt, server.crt, server.key)")
    tls = settings.tls_dir.resolve()
    return (f"listener {settings.tls_port} {settings.tls_bind or settings.bind}\ncafile {tls / 'ca.crt'}\n"
            f"certfile {tls / 'server.crt'}\nkeyfile {tls / 'server.key'}\n")


def check_credentials(settings: BrokerSettings) -> None:
    """A broker that requires logins but has no users would refuse everyone: say so before starting."""
    folder = settings.credentials_folder
    if not settings.allow_anonymous and not ((folder / "passwd").exists() and (folder / "acl").exists()):
        raise BrokerError(f"no broker credentials in {folder}: run `edgeprune credentials init` "
                          "(or set [broker] allow_anonymous = true on a closed lab network)")


def render_bridge(site: SiteSettings, topics: Topics) -> str:
    """The bridge section that forwards this site's results, status and errors to the central broker."""
    prefix = topics.central_prefix(site.site_id)
    credentials = ""
    if site.bridge_username:
        credentials = f"remote_username {site.bridge_username}\n"
        if site.bridge_password:
            credentials += f"remote_password {site.bridge_password.get_secret_value()}\n"
    tls = f"bridge_cafile {site.bridge_tls_ca.resolve()}\n" if site.bridge_tls_ca else ""
    lines = "".join(f"topic {pattern} out 1 {topics.root}/ {prefix}\n" for pattern in topics.bridged)
    return BRIDGE_TEMPLATE.read_text().format(
        site_id=site.site_id, central_host=site.central_host, central_port=site.central_port,
        restart_max_s=site.bridge_restart_max_s, keepalive_s=site.bridge_keepalive_s, remote_prefix=prefix,
        credentials=credentials, tls=tls, topics=lines)


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise BrokerError("mosquitto is not installed: run ./install.sh (or apt-get install mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def write_config(settings: BrokerSettings, site: SiteSettings | None = None, topic_root: str = "edgeprune") -> Path:
    """Render the config into the data folder (mosquitto reads it from there; private: it may hold a password)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    conf = settings.data_dir / "mosquitto.conf"
    conf.touch(mode=0o600)
    conf.chmod(0o600)  # also when an older, readable file is there
    conf.write_text(render_config(settings, site, topic_root))
    return conf


def start_broker(settings: BrokerSettings, log_file=None, wait_s: float = 10.0, site: SiteSettings | None = None,
                 topic_root: str = "edgeprune") -> subprocess.Popen:
    """Start mosquitto in the background and wait until it accepts connections (with ``site``: bridged)."""
    check_credentials(settings)
    conf = write_config(settings, site, topic_root)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log_file or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log_file else subprocess.DEVNULL)
    host = "127.0.0.1" if settings.bind in ("0.0.0.0", "::") else settings.bind
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with code {proc.returncode}; config {conf}")
        if port_open(host, settings.port):
            return proc
        time.sleep(0.05)
    proc.terminate()
    raise BrokerError(f"mosquitto did not open {host}:{settings.port} within {wait_s} s")


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM (mosquitto saves its persistence db on it), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
