# scripts/stack.d/postgres.sh — the PostgreSQL part of scripts/stack (sourced, not run).
# shellcheck shell=bash

PG_DATA=$STACK_DIR/postgres
# A quarter of RAM, as managed servers size it, between 128MB (Postgres's default) and 2GB.
if [[ -z ${PG_SHARED_BUFFERS:-} ]]; then
    PG_SHARED_BUFFERS=$(awk '/^MemTotal:/ { mb = int($2 / 4096); if (mb > 2048) mb = 2048; if (mb < 128) mb = 128; print mb "MB" }' /proc/meminfo 2>/dev/null || true)
    PG_SHARED_BUFFERS=${PG_SHARED_BUFFERS:-128MB}
fi
PG_LOG=$STACK_DIR/postgres.log
# The Unix socket lives with our data (not /var/run/postgresql, which may be missing or belong to
# Debian's cluster). Socket paths are limited to ~107 bytes, so a deep checkout falls back to /tmp.
PG_SOCKET_DIR=$STACK_DIR/pg-socket
if ((${#PG_SOCKET_DIR} > 90)); then
    PG_SOCKET_DIR=/tmp/stripe-pipeline-pg-$(printf '%s' "$STACK_DIR" | sha256sum | cut -c1-12)
fi

# Postgres refuses to run as root: as root we run it as the `postgres` OS user, otherwise as
# ourselves. `cd /` because Postgres tools fail when they cannot read their working directory
# (e.g. /root, or a mktemp -d checkout) as that user.
if [[ $EUID -eq 0 ]]; then
    PG_OS_USER=postgres
    as_pg() { (cd / && exec runuser -u postgres -- "$@") 9>&-; }
else
    PG_OS_USER=$(id -un)
    as_pg() { (cd / && exec "$@") 9>&-; }
fi

PG_BIN=""
# Newest installed server >= 15; Debian installs it in /usr/lib/postgresql/<major>/bin.
find_pg_bin() {
    local dir major best="" best_major=0
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x $dir/postgres && -x $dir/pg_ctl && -x $dir/initdb ]] || continue
        major=${dir#/usr/lib/postgresql/}
        major=${major%%/*}
        [[ $major =~ ^[0-9]+$ ]] || continue
        if ((major >= PG_MIN_MAJOR && major > best_major)); then
            best=$dir best_major=$major
        fi
    done
    # Non-Debian layouts: whatever pg_ctl is on PATH.
    if [[ -z $best ]] && command -v pg_ctl >/dev/null; then
        dir=$(dirname -- "$(readlink -f -- "$(command -v pg_ctl)")")
        major=$("$dir/postgres" --version 2>/dev/null | sed -n 's/.* \([0-9][0-9]*\)[.0-9]*.*/\1/p' | head -n1)
        if [[ -x $dir/initdb && ${major:-0} -ge $PG_MIN_MAJOR ]]; then best=$dir; fi
    fi
    PG_BIN=$best
    [[ -n $PG_BIN ]]
}

# apt-get install postgresql, without letting Debian start (or later auto-start) its own `main`
# cluster on port 5432, which our cluster needs.
install_postgres() {
    local policy=/usr/sbin/policy-rc.d conf our_policy=""
    local -A before=()
    for conf in /etc/postgresql/*/*/start.conf; do
        if [[ -e $conf ]]; then before[$conf]=1; fi
    done
    if [[ $EUID -eq 0 && ! -e $policy ]]; then
        # invoke-rc.d (used by the package's postinst) does not start services while this
        # answers 101 ("action forbidden"). Removed right after the install (or on exit).
        printf '#!/bin/sh\n# temporary, from scripts/stack\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        CLEANUP_PATHS+=("$policy")
        our_policy=1
    fi
    apt_install postgresql
    if [[ -n $our_policy ]]; then rm -f -- "$policy"; fi
    # The package created a `main` cluster: keep it from starting at boot, and stop it should
    # something have started it anyway.
    for conf in /etc/postgresql/*/*/start.conf; do
        [[ -e $conf && -z ${before[$conf]:-} ]] || continue
        echo manual >"$conf"
        local ver name
        ver=$(basename -- "$(dirname -- "$(dirname -- "$conf")")")
        name=$(basename -- "$(dirname -- "$conf")")
        log "Debian created its own cluster $ver/$name; set it to start manually (unused here)"
        if command -v pg_ctlcluster >/dev/null && pg_lsclusters -h 2>/dev/null | grep "^$ver \+$name .* online" >/dev/null; then
            pg_ctlcluster "$ver" "$name" stop || true
        fi
    done
}

# Pid of the postmaster running on OUR data directory, or failure.
pg_our_pid() {
    local pid
    [[ -r $PG_DATA/postmaster.pid ]] || return 1
    pid=$(head -n 1 -- "$PG_DATA/postmaster.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == postgres* ]] || return 1
    echo "$pid"
}

pg_isready_tcp() {
    [[ -n $PG_BIN ]] || return 1
    "$PG_BIN/pg_isready" -q -h "$PG_HOST" -p "$PG_PORT" -d postgres -U "$PG_APP_USER" -t 2
}

# Log in exactly as the services will. Prints 't' / 'f' (can the role create databases?).
pg_app_login() {
    PGPASSWORD=$PG_APP_PASSWORD PGCONNECT_TIMEOUT=5 PGSSLMODE=disable \
        "$PG_BIN/psql" -h "$PG_HOST" -p "$PG_PORT" -U "$PG_APP_USER" -d "$PG_APP_DB" \
        -qAtX -c 'select rolcreatedb from pg_roles where rolname = current_user' 2>/dev/null
}

# As root, the postgres OS user must be able to reach $STACK_DIR/postgres. A checkout in
# `mktemp -d` (mode 700) or under /root is not traversable by it, so add o+x (search only, no
# listing) on the ancestors that lack it.
ensure_pg_can_traverse() {
    [[ $EUID -eq 0 ]] || return 0
    as_pg test -x "$STACK_DIR" && return 0
    local dir=$STACK_DIR changed=()
    while :; do
        if (((8#$(stat -c %a -- "$dir") & 1) == 0)); then
            chmod o+x -- "$dir"
            changed+=("$dir")
        fi
        [[ $dir == / ]] && break
        dir=$(dirname -- "$dir")
    done
    ((${#changed[@]} == 0)) || log "added o+x (traverse only) to ${changed[*]} so the postgres user can reach $PG_DATA"
    as_pg test -x "$STACK_DIR" ||
        die "the '$PG_OS_USER' user cannot reach $STACK_DIR (check ACLs/group permissions of its parents), or set STACK_DIR to a directory it can reach"
}

init_pg_cluster() {
    log "creating a PostgreSQL cluster in $PG_DATA ..."
    # initdb into a temporary directory and rename it: a half-done initdb never looks finished.
    local tmp=$STACK_DIR/postgres.initdb-tmp
    rm -rf -- "$tmp"
    mkdir -m 700 -- "$tmp"
    [[ $EUID -ne 0 ]] || chown postgres: -- "$tmp"
    CLEANUP_PATHS+=("$tmp")
    # Bootstrap superuser = the OS user ($PG_OS_USER), reachable only over the Unix socket by peer
    # auth; TCP needs a password (scram-sha-256). C locale: always present, fastest collation.
    if ! as_pg "$PG_BIN/initdb" -D "$tmp" -E UTF8 --no-locale --auth-local=peer \
        --auth-host=scram-sha-256 >"$STACK_DIR/initdb.log" 2>&1; then
        show_log_tail "$STACK_DIR/initdb.log"
        die "initdb failed"
    fi
    as_pg tee "$tmp/pg_hba.conf" >/dev/null <<EOF
# Written by scripts/stack.
# TYPE  DATABASE  USER  ADDRESS         METHOD
local   all       all                   peer
hostssl all       all   127.0.0.1/32    scram-sha-256
host    all       all   127.0.0.1/32    scram-sha-256
EOF
    # Our settings live in stack.conf, rewritten at every start (see write_pg_conf).
    printf "\n# scripts/stack settings\ninclude_if_exists = 'stack.conf'\n" |
        as_pg tee -a "$tmp/postgresql.conf" >/dev/null
    mv -- "$tmp" "$PG_DATA"
}

# lz4 where the server was built with it (Debian's and the official builds are), else pglz.
pg_wal_compression() {
    if [[ -n $PG_BIN ]] && ldd "$PG_BIN/postgres" 2>/dev/null | grep -q liblz4; then echo lz4; else echo pglz; fi
}

pg_conf_text() {
    local sock=${PG_SOCKET_DIR//\'/\'\'}
    cat <<EOF
# Written by scripts/stack at every start; edits here are lost.
listen_addresses = '$PG_HOST'
port = $PG_PORT
unix_socket_directories = '$sock'
max_connections = $PG_MAX_CONNECTIONS
password_encryption = 'scram-sha-256'
# TLS with the local CA's server certificate (copied into the data directory, where Postgres
# insists the key belongs to it with mode 600). Plaintext connections keep working.
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
# What a managed Postgres of this size runs (the big providers set shared_buffers to about a
# quarter of RAM and max_wal_size in GBs), not the compiled-in defaults (128MB, 1GB): with those
# a 1M-event catch-up outgrew the buffers (backends evicted 1.15M dirty buffers themselves) and
# forced a checkpoint per GB of WAL, each followed by full-page writes of every page touched
# again, so the cost per event grew with the log (BENCHMARKS.md, "Catch-up, 2026-12-02 second
# round"). shared_buffers takes effect at the next restart of the server.
shared_buffers = '$PG_SHARED_BUFFERS'
max_wal_size = '8GB'
min_wal_size = '1GB'
checkpoint_timeout = '15min'
wal_compression = '$(pg_wal_compression)'
EOF
}

# Writes stack.conf and the server certificate; succeeds only when something changed.
write_pg_conf() {
    local want
    want=$(pg_conf_text)
    if [[ -f $PG_DATA/stack.conf && $(<"$PG_DATA/stack.conf") == "$want" ]] &&
        cmp -s -- "$SERVER_CERT" "$PG_DATA/server.crt" && as_pg test -r "$PG_DATA/server.key"; then
        return 1
    fi
    as_pg tee "$PG_DATA/server.crt" <"$SERVER_CERT" >/dev/null
    as_pg tee "$PG_DATA/server.key" <"$SERVER_KEY" >/dev/null
    as_pg chmod 600 "$PG_DATA/server.key"
    printf '%s\n' "$want" | as_pg tee "$PG_DATA/stack.conf" >/dev/null
}

# A cluster started by an older scripts/stack (or before the certificate changed): apply the
# settings with a reload. Those a reload cannot change (shared_buffers) wait for a restart,
# which is said rather than done: the running server may be serving others.
pg_apply_conf() {
    write_pg_conf || return 0
    log "PostgreSQL: applying the settings (reload) ..."
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -s reload || die "pg_ctl reload failed; see $PG_LOG"
    local pending
    pending=$(as_pg "$PG_BIN/psql" -h "$PG_SOCKET_DIR" -p "$PG_PORT" -d postgres -qAtX \
        -c "select string_agg(name, ', ') from pg_settings where pending_restart" 2>/dev/null || true)
    [[ -z $pending ]] ||
        log "PostgreSQL: $pending take effect at the next restart (scripts/stack down && scripts/stack up)"
}

# Log in over TLS, verifying the server certificate against our CA, as DATABASE_URL_TLS does.
pg_tls_login() {
    PGPASSWORD=$PG_APP_PASSWORD PGCONNECT_TIMEOUT=5 \
        "$PG_BIN/psql" "host=localhost hostaddr=$PG_HOST port=$PG_PORT user=$PG_APP_USER dbname=$PG_APP_DB sslmode=verify-full sslrootcert=$CA_CERT" \
        -qAtX -c 'select ssl from pg_stat_ssl where pid = pg_backend_pid()' 2>/dev/null
}

wait_pg_tls() {
    local deadline=$((SECONDS + 10))
    until [[ $(pg_tls_login || true) == t ]]; do
        ((SECONDS < deadline)) || { show_log_tail "$PG_LOG" 10; die "PostgreSQL does not accept TLS connections on $PG_HOST:$PG_PORT with the local CA"; }
        sleep "$POLL_INTERVAL"
    done
}

# Create the application role and database (idempotent), as the superuser over the Unix socket.
pg_bootstrap_app() {
    as_pg "$PG_BIN/psql" -h "$PG_SOCKET_DIR" -p "$PG_PORT" -d postgres -qAtX -v ON_ERROR_STOP=1 >/dev/null <<EOF
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_APP_USER') THEN
    CREATE ROLE $PG_APP_USER LOGIN CREATEDB PASSWORD '$PG_APP_PASSWORD';
  ELSE
    ALTER ROLE $PG_APP_USER LOGIN CREATEDB PASSWORD '$PG_APP_PASSWORD';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE $PG_APP_DB OWNER $PG_APP_USER'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_APP_DB') \gexec
EOF
}

start_pg() {
    ensure_pg_can_traverse
    [[ -f $PG_DATA/PG_VERSION ]] || init_pg_cluster
    local major
    major=$(<"$PG_DATA/PG_VERSION")
    [[ $PG_BIN == */"$major"/bin || $("$PG_BIN/postgres" --version) == *" $major."* ]] ||
        die "$PG_DATA was created by PostgreSQL $major but the server found is $PG_BIN; remove $PG_DATA (losing its data) or install PostgreSQL $major"
    write_pg_conf || true
    mkdir -p -m 700 -- "$PG_SOCKET_DIR"
    touch -- "$PG_LOG"
    if [[ $EUID -eq 0 ]]; then chown postgres: -- "$PG_SOCKET_DIR" "$PG_LOG"; fi
    log "starting PostgreSQL (log: $PG_LOG) ..."
    # pg_ctl -w polls until the server accepts connections (or exits), with our deadline; it also
    # puts the postmaster in its own session so it outlives this script and the terminal.
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$PG_START_TIMEOUT" -s start; then
        show_log_tail "$PG_LOG"
        die "PostgreSQL did not start within ${PG_START_TIMEOUT}s"
    fi
}

wait_pg_tcp() {
    local deadline=$((SECONDS + PG_START_TIMEOUT))
    until pg_isready_tcp; do
        if ((SECONDS >= deadline)) || ! pg_our_pid >/dev/null; then
            show_log_tail "$PG_LOG"
            die "PostgreSQL does not accept connections on $PG_HOST:$PG_PORT"
        fi
        sleep "$POLL_INTERVAL"
    done
}

ensure_pg() {
    local started=""
    find_pg_bin || { install_postgres; find_pg_bin; } ||
        die "no PostgreSQL >= $PG_MIN_MAJOR server found (looked in /usr/lib/postgresql/*/bin and PATH)"

    local pid
    if pid=$(pg_our_pid); then
        wait_pg_tcp
        pg_apply_conf
    elif pg_isready_tcp; then
        # Someone else's server on our port. Fine if our credentials work there.
        local can_create
        if can_create=$(pg_app_login); then
            log "PostgreSQL: reusing the server already on $PG_HOST:$PG_PORT (not started by scripts/stack; $(port_owner "$PG_PORT"))"
            [[ $can_create == t ]] || log "warning: role $PG_APP_USER there lacks CREATEDB; tests that create databases will fail"
            return 0
        fi
        die "port $PG_PORT is taken by a PostgreSQL server not started by scripts/stack ($(port_owner "$PG_PORT")), where $PG_APP_USER/$PG_APP_PASSWORD cannot log in to $PG_APP_DB. Stop it (Debian's own cluster: pg_ctlcluster <version> main stop) or create that role and database in it."
    else
        start_pg
        wait_pg_tcp
        started=1
        pid=$(pg_our_pid) || die "PostgreSQL started but its pid file is missing"
    fi

    # Our own cluster: make sure the application role/database exist and are usable. Freshly
    # started: create/fix them right away; already running: only when logging in fails.
    if [[ -n ${started:-} || $(pg_app_login || true) != t ]]; then
        pg_bootstrap_app || { show_log_tail "$PG_LOG" 10; die "could not create role $PG_APP_USER / database $PG_APP_DB"; }
        [[ $(pg_app_login || true) == t ]] ||
            die "cannot log in as $PG_APP_USER to $PG_APP_DB on $PG_HOST:$PG_PORT after creating them"
    fi
    wait_pg_tls
    log "PostgreSQL is up (pid $pid, $PG_HOST:$PG_PORT, TLS too, data $PG_DATA)"
}

stop_pg() {
    find_pg_bin || true
    local pid
    if pid=$(pg_our_pid); then
        log "stopping PostgreSQL (pid $pid) ..."
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 -s stop ||
            die "PostgreSQL (pid $pid) did not stop; see $PG_LOG"
        log "PostgreSQL stopped"
    elif [[ -n $PG_BIN ]] && pg_isready_tcp; then
        log "PostgreSQL: the server on $PG_HOST:$PG_PORT was not started by scripts/stack; leaving it alone"
    else
        log "PostgreSQL is not running"
    fi
}

# One status line; fails when Postgres is not usable.
pg_status() {
    local pid
    find_pg_bin || true
    if pid=$(pg_our_pid) && pg_isready_tcp; then
        echo "postgres: running (pid $pid, $PG_HOST:$PG_PORT, data $PG_DATA)"
    elif [[ -n ${pid:-} ]]; then
        echo "postgres: process $pid runs but does not accept connections on $PG_HOST:$PG_PORT"
        return 3
    elif [[ -n $PG_BIN ]] && pg_isready_tcp; then
        if pg_app_login >/dev/null; then
            echo "postgres: running, not started by scripts/stack ($PG_HOST:$PG_PORT, $(port_owner "$PG_PORT"))"
        else
            echo "postgres: a server not started by scripts/stack is on $PG_HOST:$PG_PORT ($(port_owner "$PG_PORT")), but $PG_APP_USER cannot log in to $PG_APP_DB there"
            return 3
        fi
    else
        echo "postgres: not running"
        return 3
    fi
}
