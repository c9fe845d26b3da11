#!/usr/bin/env bash
# Install edgeprune on this machine (a Raspberry Pi or a Debian box). Idempotent: re-run freely.
#
#   ./install.sh [--role gateway|node|camera|all] [--dev] [--systemd] [--tls] [--no-apt]
#
#   --role     what this device runs (default: all). gateway and all also get mosquitto.
#   --dev      test tools too (pytest, headless Chromium for the web test).
#   --systemd  write and enable systemd units (Restart=always) for the role.
#   --tls      (gateway/all) make a self-signed CA and broker certificate in run/broker/tls (openssl)
#              and turn on the broker's TLS listener on port 8883 (docs/security.md).
#   --no-apt   skip Debian packages (you installed them yourself).
#
# gateway/all also make the broker's users (one per device, docs/security.md): run/broker/credentials.
#
# Environment: EDGEPRUNE_TORCH_SPEC (default torch==2.13.0: on x86 a CPU build, on a Pi's
# aarch64 the PyPI wheel, which is CPU-only), EDGEPRUNE_VENV (default .venv).
set -euo pipefail

ROLE=all DEV=0 SYSTEMD=0 APT=1 TLS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --role) ROLE="${2:?--role needs a value}"; shift 2 ;;
    --role=*) ROLE="${1#--role=}"; shift ;;
    --dev) DEV=1; shift ;;
    --systemd) SYSTEMD=1; shift ;;
    --tls) TLS=1; shift ;;
    --no-apt) APT=0; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$ROLE" in gateway|node|camera|all) ;; *) echo "install.sh: --role must be gateway, node, camera or all" >&2; exit 2 ;; esac

cd "$(dirname "$0")"
HERE="$(pwd)"
VENV="${EDGEPRUNE_VENV:-$HERE/.venv}"
TORCH_SPEC="${EDGEPRUNE_TORCH_SPEC:-torch==2.13.0}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# --- Debian packages -------------------------------------------------------------------------
packages=()
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3 python3-venv)
case "$ROLE" in gateway|all) packages+=(mosquitto mosquitto-clients sqlite3 openssl) ;; esac
[ "$DEV" -eq 1 ] && packages+=(mosquitto mosquitto-clients chromium chromium-driver)
if [ "$APT" -eq 1 ] && [ ${#packages[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

# --- Python environment ----------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
want_torch="${TORCH_SPEC#torch==}"
have_torch="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$have_torch" != "$want_torch" ]; then
  say "installing $TORCH_SPEC (CPU)"
  "${PIP[@]}" "$TORCH_SPEC"
fi
extras=""
case "$ROLE" in gateway|all) extras="train" ;; esac
[ "$DEV" -eq 1 ] && extras="${extras:+$extras,}dev,train"
say "installing edgeprune${extras:+[$extras]}"
"${PIP[@]}" -e ".${extras:+[$extras]}"
case "$ROLE" in
  gateway|all)  # training data: its own loader imports TensorFlow, so skip dependencies
    "$VENV/bin/python" -c 'import animal_mnist' 2>/dev/null || "${PIP[@]}" --no-deps "animal-mnist==0.4" ;;
esac

# --- broker users and TLS (the broker runs here) ----------------------------------------------
CONFIG_ARGS=()
[ -f /etc/edgeprune/edgeprune.toml ] && CONFIG_ARGS=(--config /etc/edgeprune/edgeprune.toml)
CREDS="$HERE/run/broker/credentials"
case "$ROLE" in
  gateway|all)
    say "broker users (one per device) in $CREDS"
    "$VENV/bin/edgeprune" credentials "${CONFIG_ARGS[@]}" --dir "$CREDS" init
    if [ "$TLS" -eq 1 ]; then
      TLS_DIR="$HERE/run/broker/tls"
      mkdir -p "$TLS_DIR" && chmod 700 "$TLS_DIR"
      if [ ! -f "$TLS_DIR/server.crt" ]; then
        say "self-signed CA and broker certificate in $TLS_DIR (copy ca.crt to every device)"
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=edgeprune site CA" \
          -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=$(hostname)" \
          -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
        openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
          -CAcreateserial -days 3650 -out "$TLS_DIR/server.crt" \
          -extfile <(printf "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:%s" "$(hostname)") 2>/dev/null
      fi
      echo "TLS: set [broker] tls_port = 8883 and tls_dir = \"$TLS_DIR\"; clients: [mqtt] port = 8883, tls_ca = ca.crt"
    fi ;;
esac

# --- systemd units ---------------------------------------------------------------------------
if [ "$SYSTEMD" -eq 1 ]; then
  case "$ROLE" in
    gateway) services=(broker gateway web) ;;
    node) services=(node) ;;
    camera) services=(camera) ;;
    all) services=(broker gateway web node) ;;
  esac
  $SUDO mkdir -p /etc/edgeprune
  [ -f /etc/edgeprune/edgeprune.toml ] || $SUDO cp "$HERE/docs/edgeprune.example.toml" /etc/edgeprune/edgeprune.toml
  # each service logs in to the broker with its own user (EDGEPRUNE_MQTT_USERNAME/PASSWORD)
  for pair in gateway:gateway web:web node:node-1; do
    svc="${pair%%:*}" user="${pair#*:}"
    if [[ " ${services[*]} " == *" $svc "* && -f "$CREDS/$user.env" && ! -f /etc/edgeprune/$svc.env ]]; then
      $SUDO install -m 600 "$CREDS/$user.env" "/etc/edgeprune/$svc.env"
    fi
  done
  for svc in "${services[@]}"; do
    unit="/etc/systemd/system/edgeprune-$svc.service"
    after="network-online.target"
    [[ " ${services[*]} " == *" broker "* && "$svc" != broker ]] && after+=" edgeprune-broker.service"
    say "writing $unit"
    $SUDO tee "$unit" >/dev/null <<UNIT
[Unit]
Description=edgeprune $svc
After=$after
Wants=network-online.target

[Service]
Environment=EDGEPRUNE_CONFIG=/etc/edgeprune/edgeprune.toml
EnvironmentFile=-/etc/edgeprune/$svc.env
ExecReload=/bin/kill -HUP \$MAINPID
WorkingDirectory=$HERE
ExecStart=$VENV/bin/edgeprune $svc
Restart=always
RestartSec=3

[Install]
WantedBy=multi-user.target
UNIT
  done
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    # our broker replaces the stock one: both would want port 1883
    if [[ " ${services[*]} " == *" broker "* ]]; then $SUDO systemctl disable --now mosquitto.service 2>/dev/null || true; fi
    $SUDO systemctl daemon-reload
    for svc in "${services[@]}"; do $SUDO systemctl enable --now "edgeprune-$svc.service"; done
  else
    echo "systemd is not running here: units written, not started"
  fi
fi

say "done: $VENV/bin/edgeprune --help"
