# shellcheck shell=bash
# The central collector's PostgreSQL (sourced by install.sh: --role central --db postgres; docs/scaling.md).
#
# A local server (Debian's `postgresql`, cluster "main") gets a login role and a database of its own for the
# collector, both named edgeprune; the role gets a new random password on every run and the URL is written
# where the collector's unit reads its environment. With --db-url an existing server is used as given.

# PSQL: how to reach the local server as its superuser (the tests point it at a throwaway server)
PSQL="${EDGEPRUNE_PSQL:-}"

as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

# start_local_postgres: the newest installed cluster "main", started if it is down (no systemd in a container)
start_local_postgres() {
  [ -n "$PSQL" ] && return 0
  if as_postgres psql -Atqc 'SELECT 1' >/dev/null 2>&1; then return 0; fi
  local version
  version="$(ls /usr/lib/postgresql | sort -n | tail -1)"
  say "starting PostgreSQL $version (cluster main)"
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl enable --now "postgresql@$version-main"
  else
    $SUDO pg_ctlcluster "$version" main start
  fi
}

# central_postgres_url: make (or keep) the role and database; prints the collector's URL
central_postgres_url() {
  local password port psql
  start_local_postgres
  if [ -n "$PSQL" ]; then read -r -a psql <<<"$PSQL"; else psql=(as_postgres psql); fi
  password="$(openssl rand -hex 24)"
  "${psql[@]}" -v ON_ERROR_STOP=1 -qc "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'edgeprune') THEN CREATE ROLE edgeprune LOGIN; END IF;
    END \$\$; ALTER ROLE edgeprune LOGIN PASSWORD '$password';" >&2
  if [ "$("${psql[@]}" -Atqc "SELECT 1 FROM pg_database WHERE datname = 'edgeprune'")" != 1 ]; then
    "${psql[@]}" -v ON_ERROR_STOP=1 -qc "CREATE DATABASE edgeprune OWNER edgeprune" >&2
  fi
  port="$("${psql[@]}" -Atqc 'SHOW port')"
  echo "postgresql://edgeprune:$password@127.0.0.1:$port/edgeprune"
}

# set_env_line FILE NAME VALUE: NAME=VALUE in an env file (replaced if there), the file kept private
set_env_line() {
  local file="$1" name="$2" value="$3"
  [ -f "$file" ] || $SUDO install -m 0600 /dev/null "$file"
  { grep -v "^$name=" "$file" || true; echo "$name=$value"; } | $SUDO tee "$file.new" >/dev/null
  $SUDO chmod --reference="$file" "$file.new" && $SUDO chown --reference="$file" "$file.new"
  $SUDO mv "$file.new" "$file"
}
