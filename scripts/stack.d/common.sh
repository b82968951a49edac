# scripts/stack.d/common.sh — helpers of every part of scripts/stack (sourced, not run).
# shellcheck shell=bash

log() { printf 'stack: %s\n' "$*" >&2; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

# Print the last lines of a log file to stderr, indented, to explain a failure.
show_log_tail() {
    local file=$1 lines=${2:-40}
    if [[ -s $file ]]; then
        printf 'stack: last %s lines of %s:\n' "$lines" "$file" >&2
        tail -n "$lines" -- "$file" | sed 's/^/  | /' >&2
    fi
}

# True when something accepts TCP connections on host:port. Only used for Kafka (a bare connect
# makes Postgres log "incomplete startup packet"; for Postgres we use pg_isready).
tcp_open() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Who listens on a port, for error messages (best effort: ss may be missing or show no process).
port_owner() {
    local out
    out=$(ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/\1/p' | head -n 1) || true
    printf '%s' "${out:-unknown process}"
}

# True while process $1 exists and is not a zombie (a zombie still answers kill -0; here the
# broker is re-parented to PID 1 once this script exits, and some inits reap lazily).
alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# Paths we created and must remove however the script exits (temp dirs, a policy-rc.d).
CLEANUP_PATHS=()
cleanup() { ((${#CLEANUP_PATHS[@]} == 0)) || rm -rf -- "${CLEANUP_PATHS[@]}"; }
trap cleanup EXIT

# Serialise up/down/kafka-* so that e.g. scripts/run and scripts/test started together don't both
# initdb or both start a broker. fd 9 is closed for every long-lived child (see as_pg and
# start_kafka): a daemon that inherited it would hold the lock forever.
take_lock() {
    mkdir -p -- "$STACK_DIR"
    exec 9>>"$STACK_DIR/.lock"
    if ! flock -n 9; then
        log "waiting for another scripts/stack run to finish ..."
        flock -w 300 9 || die "timed out waiting for the lock $STACK_DIR/.lock"
    fi
}

apt_install() {
    [[ $EUID -eq 0 ]] || die "missing: $*; install it with: sudo apt-get install -y $*"
    command -v apt-get >/dev/null || die "missing: $* (and no apt-get to install it with)"
    log "installing $* with apt-get ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "$@" >&2 || die "apt-get install $* failed"
}

