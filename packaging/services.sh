# shellcheck shell=bash
# Services a technician can trust (sourced by install.sh; issue 15).
#
# Every unit runs as the dedicated system user `edgeprune`, never root: it owns /var/lib/edgeprune (the
# database, the broker's persistence, caches: the only place a unit may write) and can read the config,
# which nobody else can (it will hold MQTT passwords). Mosquitto is started by the broker unit from our
# rendered config, so it runs as that same unprivileged user. The source tree and venv stay read-only.

SERVICE_USER=edgeprune
DATA_DIR="${EDGEPRUNE_DATA_DIR:-/var/lib/edgeprune}"
CONFIG_DIR="${EDGEPRUNE_CONFIG_DIR:-/etc/edgeprune}"
UNIT_DIR="${EDGEPRUNE_UNIT_DIR:-/etc/systemd/system}"

# services_for ROLE: the edgeprune units a role runs.
services_for() {
  case "$1" in
    gateway) echo "broker gateway web" ;;
    node) echo "node" ;;
    camera) echo "camera" ;;
    all) echo "broker gateway web node" ;;
    central) echo "broker collect" ;;  # the central broker sites bridge to, and its collector (docs/scaling.md)
  esac
}

# render_unit SVC AFTER: the hardened unit for `edgeprune SVC`, on stdout (uses HERE and VENV).
render_unit() {
  local svc="$1" after="$2" protect_home=yes writable="ReadWritePaths=$DATA_DIR"
  case "$HERE/" in /home/*|/root/*) protect_home=read-only ;; esac  # the venv lives there: read it, never write
  case "$DATA_DIR" in /var/lib/?*) writable="StateDirectory=${DATA_DIR#/var/lib/}"$'\nStateDirectoryMode=0750' ;; esac
  cat <<UNIT
[Unit]
Description=edgeprune $svc
After=$after
Wants=network-online.target

[Service]
Environment=EDGEPRUNE_CONFIG=$CONFIG_DIR/edgeprune.toml
# the service's own broker login (EDGEPRUNE_MQTT_USERNAME/PASSWORD), copied from the gateway's credentials
EnvironmentFile=-$CONFIG_DIR/$svc.env
ExecStart=$VENV/bin/edgeprune $svc
Restart=always
RestartSec=3
User=$SERVICE_USER
Group=$SERVICE_USER
# relative paths in the config (and torch's caches under HOME) land in the one writable place
WorkingDirectory=$DATA_DIR
Environment=HOME=$DATA_DIR
$writable
UMask=0027
# hardening: nothing but the data directory is writable, no way back to root, a private /tmp
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=$protect_home
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
UNIT
}

# create_service_user [EXAMPLE]: the system user, its data directory, the config readable by it alone
# (a first config from docs/EXAMPLE, default edgeprune.example.toml).
create_service_user() {
  local example="${1:-edgeprune.example.toml}"
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    say "creating system user $SERVICE_USER (home $DATA_DIR, no login)"
    $SUDO useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home --shell /usr/sbin/nologin \
      "$SERVICE_USER"
  fi
  $SUDO install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$DATA_DIR" "$DATA_DIR/broker"
  $SUDO install -d -o root -g "$SERVICE_USER" -m 0750 "$CONFIG_DIR"
  [ -f "$CONFIG_DIR/edgeprune.toml" ] || $SUDO cp "$HERE/docs/$example" "$CONFIG_DIR/edgeprune.toml"
  $SUDO chown root:"$SERVICE_USER" "$CONFIG_DIR/edgeprune.toml"
  $SUDO chmod 0640 "$CONFIG_DIR/edgeprune.toml"
}

# write_units ROLE: write, enable and start the role's units.
write_units() {
  local services svc after creds="${2:-}" pair user
  read -r -a services <<<"$(services_for "$1")"
  if [ "$1" = central ]; then create_service_user central.example.toml; else create_service_user; fi
  # the broker (running as the service user) reads its users from here; each service logs in as its own user
  if [ -n "$creds" ] && [ -d "$creds" ]; then
    $SUDO chown -R "$SERVICE_USER":"$SERVICE_USER" "$creds"
    for pair in gateway:gateway web:web node:node-1 collect:collect; do
      svc="${pair%%:*}" user="${pair#*:}"
      if [[ " ${services[*]} " == *" $svc "* && -f "$creds/$user.env" && ! -f "$CONFIG_DIR/$svc.env" ]]; then
        $SUDO install -m 0640 -o root -g "$SERVICE_USER" "$creds/$user.env" "$CONFIG_DIR/$svc.env"
      fi
    done
  fi
  # Debian 12 makes home directories private (0700): a tree under /home cannot be run by the service user
  if ! $SUDO runuser -u "$SERVICE_USER" -- test -x "$VENV/bin/edgeprune"; then
    echo "install.sh: the $SERVICE_USER user cannot run $VENV/bin/edgeprune (a private home directory?):" \
         "unpack edgeprune in /opt/edgeprune and install from there" >&2
    return 2
  fi
  for svc in "${services[@]}"; do
    after="network-online.target"
    [[ " ${services[*]} " == *" broker "* && "$svc" != broker ]] && after+=" edgeprune-broker.service"
    say "writing $UNIT_DIR/edgeprune-$svc.service"
    render_unit "$svc" "$after" | $SUDO tee "$UNIT_DIR/edgeprune-$svc.service" >/dev/null
  done
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    # our broker replaces the stock one: both would want port 1883
    if [[ " ${services[*]} " == *" broker "* ]]; then $SUDO systemctl disable --now mosquitto.service 2>/dev/null || true; fi
    $SUDO systemctl daemon-reload
    for svc in "${services[@]}"; do $SUDO systemctl enable --now "edgeprune-$svc.service"; done
  else
    echo "systemd is not running here: units written, not started"
  fi
}

# uninstall_role ROLE PURGE: stop and remove the role's units and the user; the data and config only if PURGE=1.
uninstall_role() {
  local role="$1" purge="$2" svc
  for svc in $(services_for "$role"); do
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      $SUDO systemctl disable --now "edgeprune-$svc.service" 2>/dev/null || true
    fi
    say "removing $UNIT_DIR/edgeprune-$svc.service"
    $SUDO rm -f "$UNIT_DIR/edgeprune-$svc.service"
  done
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then $SUDO systemctl daemon-reload; fi
  remove_site_clock
  if ls "$UNIT_DIR"/edgeprune-*.service >/dev/null 2>&1; then
    say "other edgeprune units remain: keeping user $SERVICE_USER"
  elif id -u "$SERVICE_USER" >/dev/null 2>&1; then
    say "removing system user $SERVICE_USER"
    $SUDO userdel "$SERVICE_USER"
  fi
  if [ "$purge" -eq 1 ]; then
    say "deleting $DATA_DIR and $CONFIG_DIR (--purge)"
    $SUDO rm -rf "$DATA_DIR" "$CONFIG_DIR"
  else
    say "kept the data in $DATA_DIR and the config in $CONFIG_DIR (--purge deletes them)"
  fi
}
