#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for tests and benchmarks.
#
#   scripts/pg.sh start    init (if needed) and start; idempotent; waits for pg_isready
#   scripts/pg.sh stop     stop and delete the cluster (LOCKSTEP_PG_KEEP=1 keeps the data)
#   scripts/pg.sh status   exit 0 if running
#   scripts/pg.sh url      print the connection URL
#
# Listens on 127.0.0.1:${PGPORT:-55432} only, trust auth on loopback only. The cluster lives in
# .pg/<port>/ under the repository, or in /tmp/lockstep-pg-<port>/ when running as root and the
# `postgres` user cannot reach the repository. initdb refuses to run as root, so as root every
# PostgreSQL binary runs as the `postgres` user. Installs PostgreSQL with apt-get when missing.
set -euo pipefail

PORT="${PGPORT:-55432}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WAIT_SECONDS=30

log() { printf 'pg.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# Runs a command as the cluster owner: `postgres` when we are root, ourselves otherwise.
as_owner() {
    if is_root; then
        if command -v runuser >/dev/null 2>&1; then
            (cd / && runuser -u postgres -- "$@")
        else
            (cd / && su postgres -s /bin/bash -c "$(printf '%q ' "$@")")
        fi
    else
        "$@"
    fi
}

# Directory holding initdb, pg_ctl, pg_isready: $PATH first, else the newest Debian install.
find_bindir() {
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
        printf '%s\n' "$dir"
        return 0
    fi
    return 1
}

install_postgres() {
    log "initdb/pg_ctl not found; installing PostgreSQL with apt-get"
    local sudo=()
    if ! is_root; then
        command -v sudo >/dev/null 2>&1 || die "not root and no sudo: install PostgreSQL first"
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: install PostgreSQL (initdb, pg_ctl) first"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
}

ensure_bindir() {
    if ! BINDIR="$(find_bindir)"; then
        install_postgres
        BINDIR="$(find_bindir)" || die "PostgreSQL installed but initdb/pg_ctl still not found"
    fi
    if is_root && ! id -u postgres >/dev/null 2>&1; then
        log "creating the postgres system user"
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
}

# Picks BASE (the per-port cluster directory) and makes sure the owner can write it.
choose_base() {
    local repo_base="$REPO/.pg/$PORT"
    local tmp_base="/tmp/lockstep-pg-$PORT"
    if [[ -n "${LOCKSTEP_PG_DIR:-}" ]]; then
        BASE="$LOCKSTEP_PG_DIR/$PORT"
    elif ! is_root; then
        BASE="$repo_base"
    elif [[ -d "$tmp_base" ]]; then
        BASE="$tmp_base" # an earlier run fell back to /tmp; keep using it
    else
        mkdir -p "$REPO/.pg"
        chmod 0755 "$REPO/.pg"
        if as_owner test -x "$REPO/.pg" 2>/dev/null; then
            BASE="$repo_base"
        else
            BASE="$tmp_base"
        fi
    fi
    DATA="$BASE/data"
    LOGFILE="$BASE/postgres.log"
    # Unix socket paths are limited to ~107 bytes; fall back to a short temp path.
    SOCKDIR="$BASE/run"
    if (( ${#SOCKDIR} > 80 )); then
        SOCKDIR="${TMPDIR:-/tmp}/lockstep-pg-sock-$PORT"
    fi
}

# Like choose_base, but without creating anything (for stop/status).
locate_base() {
    local dir
    for dir in "${LOCKSTEP_PG_DIR:+$LOCKSTEP_PG_DIR/$PORT}" "$REPO/.pg/$PORT" "/tmp/lockstep-pg-$PORT"; do
        if [[ -n "$dir" && -f "$dir/data/PG_VERSION" ]]; then
            BASE="$dir"
            DATA="$BASE/data"
            LOGFILE="$BASE/postgres.log"
            return 0
        fi
    done
    return 1
}

make_owned_dir() {
    mkdir -p "$1"
    if is_root; then
        chown postgres: "$1"
    fi
    chmod 0700 "$1"
}

is_running() {
    [[ -n "${DATA:-}" && -f "$DATA/PG_VERSION" ]] || return 1
    as_owner "$BINDIR/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

cmd_start() {
    ensure_bindir
    choose_base
    if is_running; then
        log "already running (data: $DATA)"
    else
        make_owned_dir "$BASE"
        make_owned_dir "$SOCKDIR"
        if [[ ! -f "$DATA/PG_VERSION" ]]; then
            rm -rf "$DATA"
            log "initdb in $DATA"
            as_owner "$BINDIR/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C \
                --auth-local=trust --auth-host=trust >"$BASE/initdb.log" 2>&1 \
                || { cat "$BASE/initdb.log" >&2; die "initdb failed"; }
            # Loopback only: nothing else may connect, so trust is safe.
            as_owner tee "$DATA/pg_hba.conf" >/dev/null <<'EOF'
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   trust
host    all       all   ::1/128        trust
EOF
            as_owner tee -a "$DATA/postgresql.conf" >/dev/null <<EOF

# lockstep throwaway cluster (scripts/pg.sh)
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCKDIR'
max_connections = 200
EOF
        fi
        log "starting on 127.0.0.1:$PORT (data: $DATA, log: $LOGFILE)"
        if ! as_owner "$BINDIR/pg_ctl" start -D "$DATA" -l "$LOGFILE" -w -t "$WAIT_SECONDS" >/dev/null; then
            tail -n 30 "$LOGFILE" >&2 || true
            die "pg_ctl start failed"
        fi
    fi
    local deadline=$((SECONDS + WAIT_SECONDS))
    until "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres; do
        if (( SECONDS >= deadline )); then
            tail -n 30 "$LOGFILE" >&2 || true
            die "not ready after ${WAIT_SECONDS}s"
        fi
        sleep 0.2
    done
    log "ready: $(cmd_url)"
}

cmd_stop() {
    if ! BINDIR="$(find_bindir)"; then
        log "PostgreSQL not installed; nothing to stop"
        return 0
    fi
    if ! locate_base; then
        log "no cluster for port $PORT; nothing to stop"
        return 0
    fi
    if is_running; then
        log "stopping (data: $DATA)"
        as_owner "$BINDIR/pg_ctl" stop -D "$DATA" -m fast -w -t "$WAIT_SECONDS" >/dev/null
    fi
    if [[ "${LOCKSTEP_PG_KEEP:-0}" != 1 ]]; then
        rm -rf "$BASE" "${TMPDIR:-/tmp}/lockstep-pg-sock-$PORT"
    fi
}

cmd_status() {
    BINDIR="$(find_bindir)" || die "PostgreSQL not installed"
    locate_base || die "no cluster for port $PORT"
    if is_running; then
        log "running on 127.0.0.1:$PORT (data: $DATA)"
    else
        log "not running (data: $DATA)"
        return 1
    fi
}

cmd_url() {
    printf 'postgres://postgres@127.0.0.1:%s/postgres\n' "$PORT"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) cmd_url ;;
    *) die "usage: $0 start|stop|status|url" ;;
esac
