# ops/lib/postgres.sh: the stack's PostgreSQL, sourced by ops/stack (which provides say, warn,
# die, is_root, port_open, read_pid_file, check_port, apt_install, export_line, and STATE_DIR
# and the other ports in load_settings, which calls pg_load_settings: a bad value stops `up`
# before anything starts).
#
# Its own cluster (initdb) with data in STATE_DIR/postgres, run by pg_ctl as user postgres when
# root (initdb refuses root), listening on 127.0.0.1 only, its socket in the state dir; a role
# and a database `scalepub` for the example project (the role may create databases: Django's
# test runner makes test_scalepub). `env` exports DATABASE_URL=postgres://scalepub:...
#
# Environment (unset: the value recorded by the last `up`, then the default):
#   SCALEPUB_POSTGRES      on|off: start PostgreSQL with the stack        on
#   SCALEPUB_PG_PORT       its TCP port on 127.0.0.1                     5432
#   SCALEPUB_PG_PASSWORD   password of role scalepub                     random, kept in the state dir

PG_OS_USER=postgres
PG_SUPERUSER=postgres
PG_ROLE=scalepub
PG_DATABASE=scalepub
PG_START_TIMEOUT=60

pg_load_settings() {
  PG_DIR=$STATE_DIR/postgres
  PG_DATA=$PG_DIR/data
  PG_SOCKET_DIR=$PG_DIR/run
  PG_LOG=$PG_DIR/postgres.log
  PG_SETTINGS=$PG_DIR/settings
  PG_PASSWORD_FILE=$STATE_DIR/pg-password
  local recorded_on="" recorded_port="" line
  if [[ -r $PG_SETTINGS ]]; then
    while IFS= read -r line; do
      case $line in
        SCALEPUB_POSTGRES=*) recorded_on=${line#*=} ;;
        SCALEPUB_PG_PORT=*) recorded_port=${line#*=} ;;
      esac
    done <"$PG_SETTINGS"
  fi
  PG_ENABLED=${SCALEPUB_POSTGRES:-${recorded_on:-on}}
  PG_PORT=${SCALEPUB_PG_PORT:-${recorded_port:-5432}}
  [[ $PG_ENABLED == on || $PG_ENABLED == off ]] ||
    die "SCALEPUB_POSTGRES must be on or off (got '$PG_ENABLED')"
  check_port SCALEPUB_PG_PORT "$PG_PORT"
  [[ $PG_ENABLED == off || " $REDIS_PORT $XMPP_PORT $HTTP_PORT " != *" $PG_PORT "* ]] ||
    die "SCALEPUB_PG_PORT=$PG_PORT is taken by another service of the stack"
}

pg_save_settings() {
  printf '%s\n' "SCALEPUB_POSTGRES=$PG_ENABLED" "SCALEPUB_PG_PORT=$PG_PORT" >"$PG_SETTINGS.tmp"
  mv -f -- "$PG_SETTINGS.tmp" "$PG_SETTINGS"
}

# Debian puts the server programs in /usr/lib/postgresql/VERSION/bin, off the PATH.
pg_bindir() {
  local dir
  for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
    [[ -x $dir/initdb && -x $dir/pg_ctl ]] && printf '%s' "$dir" && return 0
  done
  return 1
}

pg_ensure_package() {
  pg_bindir >/dev/null && return 0
  is_root || die "missing postgresql: install it (as root: apt-get install postgresql) and retry"
  say "installing postgresql (missing)"
  apt_install postgresql
  pg_bindir >/dev/null || die "postgresql installed, but no /usr/lib/postgresql/*/bin/initdb"
}

# Run a server program as the cluster's owner: user postgres when root, else oneself.
pg_as_owner() {
  if is_root; then
    runuser -u "$PG_OS_USER" -- "$@"
  else
    "$@"
  fi
}

pg_prepare_dir() {
  mkdir -p -- "$PG_DIR" "$PG_SOCKET_DIR"
  if is_root; then
    id -u "$PG_OS_USER" >/dev/null 2>&1 || die "postgres: no user $PG_OS_USER (reinstall postgresql)"
    chown "$PG_OS_USER:" -- "$PG_DIR" "$PG_SOCKET_DIR"
    pg_as_owner test -x "$STATE_DIR" ||
      die "user $PG_OS_USER cannot enter $STATE_DIR: set SCALEPUB_STACK_DIR elsewhere or fix the permissions"
  fi
  chmod 700 -- "$PG_SOCKET_DIR"
}

# A new cluster, once: superuser postgres over the socket (trust: the socket dir is the owner's
# alone), password (SCRAM) over TCP; C locale, UTF-8. --no-sync: a development cluster.
pg_init() {
  [[ -s $PG_DATA/PG_VERSION ]] && return 0
  local bin
  bin=$(pg_bindir)
  pg_as_owner "$bin/initdb" -D "$PG_DATA" -U "$PG_SUPERUSER" -E UTF8 --no-locale --no-sync \
    --auth-local=trust --auth-host=scram-sha-256 >"$PG_DIR/initdb.log" 2>&1 ||
    { tail -n 20 "$PG_DIR/initdb.log" >&2; die "postgres: initdb failed (see $PG_DIR/initdb.log)"; }
}

pg_pid() {
  local pid comm=""
  pid=$(read_pid_file "$PG_DATA/postmaster.pid")
  [[ -n $pid ]] || return 0
  { read -r comm <"/proc/$pid/comm"; } 2>/dev/null || true
  [[ $comm == postgres* ]] && printf '%s' "$pid"
  return 0
}

# The port the running server was started on (line 4 of postmaster.pid).
pg_running_port() { sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null || true; }

pg_ready() { "$(pg_bindir)/pg_isready" -q -h 127.0.0.1 -p "$1" -t 2 >/dev/null 2>&1; }

pg_start() {
  local pid bin
  pid=$(pg_pid)
  if [[ -n $pid ]]; then
    say "postgres: already running (pid $pid, port $(pg_running_port))"
    return 0
  fi
  ! port_open "$PG_PORT" || die "postgres: port $PG_PORT on 127.0.0.1 is already in use"
  bin=$(pg_bindir)
  pg_as_owner "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$PG_START_TIMEOUT" -s \
    -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$PG_SOCKET_DIR -c max_connections=200" \
    start || { tail -n 20 "$PG_LOG" >&2 || true; die "postgres: failed to start (see $PG_LOG)"; }
  say "postgres: started (pid $(pg_pid), port $PG_PORT)"
}

pg_psql() {
  "$(pg_bindir)/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p "$PG_PORT" \
    -U "$PG_SUPERUSER" "$@"
}

# The role's password: $SCALEPUB_PG_PASSWORD, else the kept one, else a new random one (kept,
# mode 600). URL-safe characters only, so DATABASE_URL needs no quoting.
pg_load_password() {
  if [[ -n ${SCALEPUB_PG_PASSWORD:-} ]]; then
    PG_PASSWORD=$SCALEPUB_PG_PASSWORD
    [[ $PG_PASSWORD =~ ^[A-Za-z0-9._~-]+$ ]] ||
      die "SCALEPUB_PG_PASSWORD may only contain letters, digits and ._~- (it goes into DATABASE_URL)"
  elif [[ -e $PG_PASSWORD_FILE ]]; then
    [[ -r $PG_PASSWORD_FILE ]] || die "cannot read $PG_PASSWORD_FILE (run as root, or set SCALEPUB_PG_PASSWORD)"
    PG_PASSWORD=$(<"$PG_PASSWORD_FILE")
    return 0
  else
    PG_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
  fi
  mkdir -p -- "$STATE_DIR"
  (umask 077 && printf '%s\n' "$PG_PASSWORD" >"$PG_PASSWORD_FILE.tmp")
  mv -f -- "$PG_PASSWORD_FILE.tmp" "$PG_PASSWORD_FILE"
}

# Role and database for the example project; the password is (re)set on every `up`.
pg_ensure_role() {
  pg_psql -d postgres -v role="$PG_ROLE" -v pw="$PG_PASSWORD" -v db="$PG_DATABASE" <<'SQL' ||
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
    die "postgres: could not create role and database $PG_ROLE"
  say "postgres: role and database $PG_ROLE ready"
}

pg_up() {
  pg_load_settings
  if [[ $PG_ENABLED == off ]]; then
    say "postgres: off (SCALEPUB_POSTGRES=off)"
    mkdir -p -- "$PG_DIR" && pg_save_settings
    return 0
  fi
  pg_ensure_package
  pg_prepare_dir
  pg_save_settings
  pg_load_password
  pg_init
  pg_start
  pg_ensure_role
}

pg_down() {
  pg_load_settings
  local pid
  pid=$(pg_pid)
  if [[ -z $pid ]]; then
    [[ $PG_ENABLED == off ]] || say "postgres: not running"
    return 0
  fi
  pg_as_owner "$(pg_bindir)/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 -s stop ||
    die "postgres: pid $pid did not stop within 60 s"
  say "postgres: stopped (pid $pid)"
}

# Exit status 0 when running and answering (or off), 3 otherwise.
pg_status() {
  pg_load_settings
  if [[ $PG_ENABLED == off ]]; then
    say "postgres: off (SCALEPUB_POSTGRES=off)"
    return 0
  fi
  local pid port
  pid=$(pg_pid)
  port=$(pg_running_port)
  if [[ -n $pid ]] && pg_ready "${port:-$PG_PORT}"; then
    say "postgres: running (pid $pid, 127.0.0.1:${port:-$PG_PORT}, database $PG_DATABASE)"
    return 0
  fi
  say "postgres: not running${pid:+ (pid $pid does not answer)}"
  return 3
}

pg_env() {
  pg_load_settings
  [[ $PG_ENABLED == on ]] || return 0
  pg_load_password
  export_line DATABASE_URL "postgres://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE"
}
