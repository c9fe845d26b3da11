#!/usr/bin/env bash
# Install edgeprune on this machine (a Raspberry Pi or a Debian box). Idempotent: re-run freely.
#
#   ./install.sh [--role gateway|node|camera|all|central] [--dev] [--systemd] [--tls] [--no-apt]
#                [--db sqlite|postgres [--db-url URL]]
#
#   --role     what this device runs (default: all). gateway and all also get mosquitto. central: a host
#              every site's broker bridges to (mosquitto + `edgeprune collect`, docs/scaling.md).
#   --dev      test tools too (pytest, headless Chromium for the web test, PostgreSQL and psycopg for the
#              central role's tests).
#   --systemd  write and enable hardened systemd units (Restart=always) for the role; they run as the
#              system user edgeprune, which alone reads /etc/edgeprune/edgeprune.toml and writes /var/lib/edgeprune.
#   --tls      (gateway/all/central) make a self-signed CA and broker certificate beside the broker's users
#              and turn on the broker's TLS listener on port 8883 (docs/security.md).
#   --sites LIST  (central) comma-separated site ids: one bridge user bridge-<site> each (more later with
#              `edgeprune credentials add bridge-<site> --role bridge`).
#   --db sqlite|postgres  (central) where `edgeprune collect` writes: an SQLite file (default) or PostgreSQL:
#              the local server (Debian's postgresql) gets a role and a database `edgeprune`, and the collector's
#              URL goes into its environment (collect.env); docs/scaling.md says when to move.
#   --db-url URL  (central, with --db postgres) an existing server instead: postgresql://user:password@host/db.
#   --public-name NAME  (central with --tls) the DNS name or IP address the sites reach this host by: the
#              certificate names it, as each site's bridge checks.
#   --no-apt   skip Debian packages (you installed them yourself).
#   --make-bundle DIR [--arch aarch64|x86_64] [--python 3.11]
#              on a connected machine: download everything every role needs into DIR, then stop
#              (packaging/bundle.sh; default arch and Python: this machine's; a Pi on Debian 12: --python 3.11).
#   --from-bundle DIR  install from a bundle with no network at all (wheels and Debian packages in DIR).
#   --uninstall  stop and remove the role's units, the chrony drop-in and the edgeprune user (when no
#              unit is left); the data (/var/lib/edgeprune) and config stay unless --purge is given too.
#   --gateway-address ADDR  (node, camera with --systemd) where chrony takes the site's time from;
#              default: [mqtt] host of /etc/edgeprune/edgeprune.toml. The gateway serves time (chrony).
#
# gateway/all also make the broker's users (one per device, docs/security.md): run/broker/credentials,
# or /var/lib/edgeprune/broker/credentials with --systemd; central makes the collector's and the sites' bridges'.
#
# Environment: EDGEPRUNE_TORCH_SPEC (default torch==2.13.0; note PyPI's 2.13.0 wheels are CUDA builds on x86_64
# and on aarch64 alike, pulling GBs of nvidia packages: a bundle carries the CPU build), EDGEPRUNE_VENV (default .venv).
set -euo pipefail

ROLE=all DEV=0 SYSTEMD=0 APT=1 TLS=0 GATEWAY_ADDRESS="" SITES="" PUBLIC_NAME="" DB=sqlite DB_URL=""
UNINSTALL=0 PURGE=0 MAKE_BUNDLE="" FROM_BUNDLE="" BUNDLE_ARCH="$(uname -m)" BUNDLE_PYTHON=""
while [ $# -gt 0 ]; do
  case "$1" in
    --role) ROLE="${2:?--role needs a value}"; shift 2 ;;
    --role=*) ROLE="${1#--role=}"; shift ;;
    --dev) DEV=1; shift ;;
    --systemd) SYSTEMD=1; shift ;;
    --tls) TLS=1; shift ;;
    --no-apt) APT=0; shift ;;
    --gateway-address) GATEWAY_ADDRESS="${2:?--gateway-address needs a value}"; shift 2 ;;
    --sites) SITES="${2:?--sites needs comma-separated site ids}"; shift 2 ;;
    --db) DB="${2:?--db needs sqlite or postgres}"; shift 2 ;;
    --db-url) DB_URL="${2:?--db-url needs a postgresql:// URL}"; shift 2 ;;
    --public-name) PUBLIC_NAME="${2:?--public-name needs a host name or address}"; shift 2 ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --make-bundle) MAKE_BUNDLE="${2:?--make-bundle needs a directory}"; shift 2 ;;
    --from-bundle) FROM_BUNDLE="${2:?--from-bundle needs a directory}"; shift 2 ;;
    --arch) BUNDLE_ARCH="${2:?--arch needs aarch64 or x86_64}"; shift 2 ;;
    --python) BUNDLE_PYTHON="${2:?--python needs a version such as 3.11}"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$ROLE" in gateway|node|camera|all|central) ;; *) echo "install.sh: --role must be gateway, node, camera, all or central" >&2; exit 2 ;; esac
case "$DB" in sqlite|postgres) ;; *) echo "install.sh: --db must be sqlite or postgres" >&2; exit 2 ;; esac
if [ "$DB" = postgres ] && [ "$ROLE" != central ]; then
  echo "install.sh: --db postgres is for --role central (a site's gateway keeps its SQLite file)" >&2; exit 2
fi
[ -z "$DB_URL" ] || [ "$DB" = postgres ] || { echo "install.sh: --db-url needs --db postgres" >&2; exit 2; }
# bundle directories are given relative to where you are, not to this script
[ -z "$MAKE_BUNDLE" ] || MAKE_BUNDLE="$(realpath -m "$MAKE_BUNDLE")"
[ -z "$FROM_BUNDLE" ] || FROM_BUNDLE="$(realpath -m "$FROM_BUNDLE")"

cd "$(dirname "$0")"
HERE="$(pwd)"
VENV="${EDGEPRUNE_VENV:-$HERE/.venv}"
TORCH_SPEC="${EDGEPRUNE_TORCH_SPEC:-torch==2.13.0}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
# shellcheck source=packaging/site-clock.sh
. "$HERE/packaging/site-clock.sh"
# shellcheck source=packaging/bundle.sh
. "$HERE/packaging/bundle.sh"
# shellcheck source=packaging/services.sh
. "$HERE/packaging/services.sh"
# shellcheck source=packaging/central-db.sh
. "$HERE/packaging/central-db.sh"

# --- uninstall (packaging/services.sh) -------------------------------------------------------
if [ "$UNINSTALL" -eq 1 ]; then
  uninstall_role "$ROLE" "$PURGE"
  exit 0
fi

# --- offline bundles (packaging/bundle.sh) ---------------------------------------------------
case "$BUNDLE_ARCH" in aarch64|x86_64) ;; *) echo "install.sh: --arch must be aarch64 or x86_64" >&2; exit 2 ;; esac
if [ -n "$MAKE_BUNDLE" ]; then
  [ -n "$BUNDLE_PYTHON" ] || BUNDLE_PYTHON="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  make_bundle "$MAKE_BUNDLE" "$BUNDLE_ARCH" "$BUNDLE_PYTHON"
  exit 0
fi
if [ -n "$FROM_BUNDLE" ]; then
  [ -d "$FROM_BUNDLE/wheels" ] || { echo "install.sh: $FROM_BUNDLE is not a bundle (no wheels/)" >&2; exit 2; }
  use_bundle_for_pip "$FROM_BUNDLE"
  if [ "$APT" -eq 1 ] && command -v dpkg >/dev/null; then install_bundle_debs "$FROM_BUNDLE"; fi
  APT=0  # everything Debian comes from the bundle
fi

# --- Debian packages -------------------------------------------------------------------------
packages=()
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3 python3-venv)
case "$ROLE" in gateway|all|central) packages+=(mosquitto mosquitto-clients sqlite3 openssl) ;; esac
[ "$DEV" -eq 1 ] && packages+=(mosquitto mosquitto-clients chromium chromium-driver postgresql)
[ "$DB" = postgres ] && [ -z "$DB_URL" ] && packages+=(postgresql)  # the central database, on this host
case "$ROLE" in gateway|node|camera) [ "$SYSTEMD" -eq 1 ] && packages+=(chrony) ;; esac  # the site's clock
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
[ "$DB" = postgres ] && extras="central"
[ "$DEV" -eq 1 ] && extras="${extras:+$extras,}dev,train,central"
say "installing edgeprune${extras:+[$extras]}"
"${PIP[@]}" -e ".${extras:+[$extras]}"
case "$ROLE" in
  gateway|all)  # training data: its own loader imports TensorFlow, so skip dependencies
    "$VENV/bin/python" -c 'import animal_mnist' 2>/dev/null || "${PIP[@]}" --no-deps "animal-mnist==0.4" ;;
esac

# --- broker users and TLS (the broker runs here) ----------------------------------------------
CONFIG_ARGS=()
[ -f /etc/edgeprune/edgeprune.toml ] && CONFIG_ARGS=(--config /etc/edgeprune/edgeprune.toml)
# the services' broker keeps its data in $DATA_DIR/broker (docs/edgeprune.example.toml); a manual run in run/broker
if [ "$SYSTEMD" -eq 1 ]; then BROKER_DIR="$DATA_DIR/broker"; else BROKER_DIR="$HERE/run/broker"; fi
CREDS="$BROKER_DIR/credentials"
case "$ROLE" in
  gateway|all|central)
    if [ "$ROLE" = central ]; then
      say "central broker users (the collector, one bridge per site) in $CREDS"
      "$VENV/bin/edgeprune" credentials "${CONFIG_ARGS[@]}" --dir "$CREDS" init --central --sites "$SITES"
    else
      say "broker users (one per device) in $CREDS"
      "$VENV/bin/edgeprune" credentials "${CONFIG_ARGS[@]}" --dir "$CREDS" init
    fi
    if [ "$TLS" -eq 1 ]; then
      TLS_DIR="$BROKER_DIR/tls"
      mkdir -p "$TLS_DIR" && chmod 700 "$TLS_DIR"
      if [ ! -f "$TLS_DIR/server.crt" ]; then
        say "self-signed CA and broker certificate in $TLS_DIR (copy ca.crt to every device)"
        san="IP:127.0.0.1,DNS:localhost,DNS:$(hostname)"
        case "$PUBLIC_NAME" in
          "") ;;
          *[!0-9.]*) san+=",DNS:$PUBLIC_NAME" ;;
          *) san+=",IP:$PUBLIC_NAME" ;;
        esac
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=edgeprune site CA" \
          -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=$(hostname)" \
          -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
        openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
          -CAcreateserial -days 3650 -out "$TLS_DIR/server.crt" \
          -extfile <(printf "subjectAltName=%s" "$san") 2>/dev/null
      fi
      if [ "$ROLE" = central ]; then
        echo "TLS: set [broker] tls_port = 8883, tls_bind = \"0.0.0.0\" and tls_dir = \"$TLS_DIR\"; each site:" \
             "[site] central_port = 8883, bridge_tls_ca = its copy of $TLS_DIR/ca.crt"
      else
        echo "TLS: set [broker] tls_port = 8883 and tls_dir = \"$TLS_DIR\"; clients: [mqtt] port = 8883, tls_ca = ca.crt"
      fi
    fi
    if [ "$ROLE" = central ]; then
      echo "each site: copy $CREDS/bridge-<site>.env to the site's gateway as /etc/edgeprune/broker.env" \
           "and set [site] central_host (docs/scaling.md)"
    fi ;;
esac

# --- the central database (packaging/central-db.sh): PostgreSQL with --db postgres ----------------
if [ "$DB" = postgres ]; then
  kept="$(sed -n 's/^EDGEPRUNE_COLLECT_DB=//p' "$CREDS/collect.env" 2>/dev/null || true)"
  if [ -z "$DB_URL" ] && [ -n "$kept" ] && EDGEPRUNE_COLLECT_DB="$kept" "$VENV/bin/python" -c \
      'import os, psycopg; psycopg.connect(os.environ["EDGEPRUNE_COLLECT_DB"], connect_timeout=10).close()' 2>/dev/null; then
    DB_URL="$kept"  # a re-run keeps the working login (a running collector stays connected)
  fi
  if [ -z "$DB_URL" ]; then
    say "PostgreSQL role and database edgeprune for the collector"
    DB_URL="$(central_postgres_url)"
  fi
  EDGEPRUNE_COLLECT_DB="$DB_URL" "$VENV/bin/python" -c 'import os, psycopg; psycopg.connect(os.environ["EDGEPRUNE_COLLECT_DB"], connect_timeout=10).close()' \
    || { echo "install.sh: cannot connect to the collector's PostgreSQL (--db-url?)" >&2; exit 2; }
  # the collector's unit reads collect.env (installed from the broker's credentials on a first --systemd run)
  set_env_line "$CREDS/collect.env" EDGEPRUNE_COLLECT_DB "$DB_URL"
  if [ "$SYSTEMD" -eq 1 ] && [ -f "$CONFIG_DIR/collect.env" ]; then
    set_env_line "$CONFIG_DIR/collect.env" EDGEPRUNE_COLLECT_DB "$DB_URL"
  fi
  echo "the collector writes to PostgreSQL: EDGEPRUNE_COLLECT_DB is in $CREDS/collect.env" \
       "(by hand: set -a; . $CREDS/collect.env; set +a; $VENV/bin/edgeprune collect;" \
       "a collector already running as a service: systemctl restart edgeprune-collect)"
fi

# --- systemd units (packaging/services.sh): hardened, as the edgeprune user ----------------------
if [ "$SYSTEMD" -eq 1 ]; then
  write_units "$ROLE" "$CREDS"
  # --- the site's clock (packaging/site-clock.sh): a device set up for the field syncs to the gateway
  [ "$ROLE" = central ] || configure_site_clock "$ROLE" "$GATEWAY_ADDRESS"
fi

say "done: $VENV/bin/edgeprune --help"
