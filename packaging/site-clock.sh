# shellcheck shell=bash
# The gateway is the site's clock (sourced by install.sh; issue 15).
#
# End-to-end latency subtracts a camera's or node's timestamp from the gateway's, so every device
# must agree with the *gateway*, not with true time (a forest has no NTP server). The gateway's
# chrony serves time to the site's private networks and keeps serving from its own clock when it
# has no upstream (local stratum); every other device syncs from the gateway only.

CHRONY_DROPIN="${EDGEPRUNE_CHRONY_DROPIN:-/etc/chrony/conf.d/edgeprune.conf}"
CHRONY_MAIN="${EDGEPRUNE_CHRONY_MAIN:-/etc/chrony/chrony.conf}"

# chrony_gateway_conf: the drop-in for the gateway, on stdout.
chrony_gateway_conf() {
  cat <<'CONF'
# Written by edgeprune install.sh --role gateway: this device is the site's clock.
# Serve time to the site network (private address ranges only).
allow 10.0.0.0/8
allow 172.16.0.0/12
allow 192.168.0.0/16
# No upstream in the field: keep serving from the local clock, so the site still agrees with
# itself. (With internet, Debian's pool servers in chrony.conf outrank this.)
local stratum 10 orphan
# A Pi has no battery clock: step at boot when an upstream is reachable.
makestep 1 3
CONF
}

# chrony_client_conf ADDRESS: the drop-in for a node or camera syncing from the gateway, on stdout.
chrony_client_conf() {
  cat <<CONF
# Written by edgeprune install.sh: follow the gateway's clock, the site's reference.
server $1 iburst minpoll 2 maxpoll 6 prefer
# The gateway's own clock may jump (no battery clock): always step to it when 0.1 s or more off.
makestep 0.1 -1
CONF
}

# gateway_address_from_config FILE: [mqtt] host of the edgeprune config (the broker runs on the gateway).
gateway_address_from_config() {
  python3 - "$1" <<'PY'
import sys, tomllib
try:
    with open(sys.argv[1], "rb") as fh:
        print(tomllib.load(fh).get("mqtt", {}).get("host", ""))
except (OSError, tomllib.TOMLDecodeError):
    print("")
PY
}

# configure_site_clock ROLE [GATEWAY_ADDRESS]: write the chrony drop-in for ROLE and restart chrony.
configure_site_clock() {
  local role="$1" address="${2:-}"
  $SUDO mkdir -p "$(dirname "$CHRONY_DROPIN")"
  case "$role" in
    gateway)
      say "chrony: this gateway serves time to the site ($CHRONY_DROPIN)"
      chrony_gateway_conf | $SUDO tee "$CHRONY_DROPIN" >/dev/null ;;
    node|camera)
      [ -n "$address" ] || address="$(gateway_address_from_config /etc/edgeprune/edgeprune.toml)"
      case "$address" in
        ""|127.*|localhost|::1)
          echo "install.sh: --role $role syncs its clock from the gateway: set [mqtt] host in" \
               "/etc/edgeprune/edgeprune.toml to the gateway's address or pass --gateway-address ADDRESS" >&2
          return 2 ;;
      esac
      say "chrony: following the gateway at $address ($CHRONY_DROPIN)"
      chrony_client_conf "$address" | $SUDO tee "$CHRONY_DROPIN" >/dev/null
      # only the gateway: a second source could pull this device away from the site's clock
      [ -f "$CHRONY_MAIN" ] && $SUDO sed -i 's/^\(pool\|server\) /#edgeprune: the gateway is the clock# \1 /' "$CHRONY_MAIN" ;;
    *) return 0 ;;
  esac
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl restart chrony.service || echo "install.sh: chrony did not restart: journalctl -u chrony" >&2
  fi
}

# remove_site_clock: undo configure_site_clock (install.sh --uninstall).
remove_site_clock() {
  $SUDO rm -f "$CHRONY_DROPIN"
  [ -f "$CHRONY_MAIN" ] && $SUDO sed -i 's/^#edgeprune: the gateway is the clock# //' "$CHRONY_MAIN"
  return 0
}
