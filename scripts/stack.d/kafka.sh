# scripts/stack.d/kafka.sh — the Kafka part of scripts/stack (sourced, not run).
# shellcheck shell=bash

KAFKA_DIR=$STACK_DIR/kafka
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_PROPS=$KAFKA_DIR/server.properties
KAFKA_CLUSTER_ID_FILE=$KAFKA_DIR/cluster-id
KAFKA_PID_FILE=$STACK_DIR/kafka.pid
KAFKA_LOG=$STACK_DIR/kafka.log
# Byte offset of kafka.log when the running broker was started: readiness is judged only on
# what that broker logged, not on "started" lines of earlier runs.
KAFKA_LOG_OFFSET_FILE=$KAFKA_DIR/log-offset
# KafkaRaftServer logs this once the broker and controller are up and serving.
KAFKA_READY_LINE='Kafka Server started'
# The SCRAM user of the SASL_SSL listener: its password is made once; the marker holds the
# password's hash once the broker knows the credential.
KAFKA_SCRAM_PASSWORD_FILE=$KAFKA_DIR/scram-password
KAFKA_SCRAM_MARKER=$KAFKA_DIR/scram-user.done
KAFKA_SECURE_CLIENT_PROPERTIES=$KAFKA_DIR/client-secure.properties

JAVA=""
find_java() {
    [[ -z $JAVA ]] || return 0
    if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
        JAVA=$JAVA_HOME/bin/java
    elif command -v java >/dev/null; then
        JAVA=$(command -v java)
    else
        apt_install openjdk-17-jre-headless
        JAVA=$(command -v java) || die "java not found after installing openjdk-17-jre-headless"
    fi
    # Kafka 4 brokers need Java 17+; an older one would only fail later with a class-version error.
    local spec
    spec=$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')
    [[ ${spec%%.*} =~ ^[0-9]+$ ]] && ((${spec%%.*} >= 17)) ||
        die "Kafka $KAFKA_VERSION needs Java 17 or newer; $JAVA is Java ${spec:-of unknown version} (set JAVA_HOME)"
}

# Resolve the broker's jars with Maven into the cache, unless a previous run completed that.
ensure_kafka_libs() {
    local want
    want=$(sha256sum -- "$KAFKA_POM" | cut -d' ' -f1)
    if [[ -f $KAFKA_LIBS_MARKER && $(<"$KAFKA_LIBS_MARKER") == "$want" && -d $KAFKA_LIBS ]]; then
        return 0
    fi
    find_java
    command -v mvn >/dev/null || apt_install maven
    log "fetching Kafka $KAFKA_VERSION jars with Maven into $KAFKA_LIBS (once) ..."
    mkdir -p -- "$KAFKA_CACHE"
    # Copy into a temp dir and rename, so an interrupted download never looks complete.
    local tmp
    tmp=$(mktemp -d -- "$KAFKA_CACHE/libs.tmp.XXXXXX")
    CLEANUP_PATHS+=("$tmp")
    # Debian's Maven prints bare ANSI resets even in batch mode; strip them (pipefail keeps
    # Maven's exit status).
    mvn -q -B -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2 ||
        die "Maven could not fetch the Kafka jars (see its output above; needs access to Maven Central)"
    compgen -G "$tmp/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null ||
        die "Maven ran but kafka_2.13-$KAFKA_VERSION.jar is not in $tmp"
    chmod 755 -- "$tmp" # mktemp -d makes it 700
    rm -rf -- "$KAFKA_LIBS" "$KAFKA_LIBS_MARKER"
    mv -- "$tmp" "$KAFKA_LIBS"
    echo "$want" >"$KAFKA_LIBS_MARKER"
}

kafka_java() {
    "$JAVA" -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_LOG4J" \
        -cp "$KAFKA_LIBS/*" "$@"
}

# Pid of the broker started from THIS stack dir, or failure (also guards against pid reuse).
kafka_our_pid() {
    local pid
    [[ -f $KAFKA_PID_FILE ]] || return 1
    pid=$(<"$KAFKA_PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"kafka.Kafka $KAFKA_PROPS"* ]] || return 1
    echo "$pid"
}

kafka_logged_ready() {
    local offset=0
    [[ -f $KAFKA_LOG_OFFSET_FILE ]] && offset=$(<"$KAFKA_LOG_OFFSET_FILE")
    # grep reads to the end (no -q): an early exit would SIGPIPE tail, and pipefail would turn
    # a found line into a failure once the log is long.
    tail -c "+$((offset + 1))" -- "$KAFKA_LOG" 2>/dev/null | grep -F -- "$KAFKA_READY_LINE" >/dev/null
}

kafka_props_text() {
    cat <<EOF
# Written by scripts/stack at every start; edits here are lost.
# Single node, KRaft: this process is both broker and (the only) controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,SASL_SSL://$KAFKA_HOST:$KAFKA_SECURE_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,SASL_SSL://$KAFKA_HOST:$KAFKA_SECURE_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
log.dirs=$KAFKA_DATA

# The secured listener (SPEC §12): TLS with the local CA's server certificate, SCRAM-SHA-512.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$SERVER_KEYSTORE

# One broker: internal topics cannot have more than one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1

# Consumers join immediately (tests); topics are created explicitly by the services.
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.partitions=1
EOF
}

write_kafka_props() {
    mkdir -p -- "$KAFKA_DIR"
    kafka_props_text >"$KAFKA_PROPS"
}

# True when the running broker was started with the settings this script writes now. A broker
# started by an older scripts/stack (no SASL_SSL listener, controller on 9093) is not.
kafka_props_current() {
    [[ -f $KAFKA_PROPS && $(<"$KAFKA_PROPS") == "$(kafka_props_text)" ]]
}

# The SCRAM password (made once) and the client properties file for the secured listener.
ensure_kafka_client_props() {
    mkdir -p -- "$KAFKA_DIR"
    if [[ ! -s $KAFKA_SCRAM_PASSWORD_FILE ]]; then
        (umask 077 && openssl rand -hex 18 >"$KAFKA_SCRAM_PASSWORD_FILE")
    fi
    local password want
    password=$(<"$KAFKA_SCRAM_PASSWORD_FILE")
    want="# Written by scripts/stack: a client of the secured listener $KAFKA_SECURE_BROKERS.
bootstrap.servers=$KAFKA_SECURE_BROKERS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.username=$KAFKA_SCRAM_USER
sasl.password=$password
ssl.ca.location=$CA_CERT"
    if [[ ! -f $KAFKA_SECURE_CLIENT_PROPERTIES || $(<"$KAFKA_SECURE_CLIENT_PROPERTIES") != "$want" ]]; then
        (umask 077 && printf '%s\n' "$want" >"$KAFKA_SECURE_CLIENT_PROPERTIES")
    fi
}

scram_marker_text() {
    printf '%s %s\n' "$KAFKA_SCRAM_USER" "$(sha256sum <"$KAFKA_SCRAM_PASSWORD_FILE" | cut -d' ' -f1)"
}

# Storage formatted by an older scripts/stack has no SCRAM credential: add it through the
# running broker (kafka-configs), once.
ensure_scram_user() {
    [[ -f $KAFKA_SCRAM_MARKER && $(<"$KAFKA_SCRAM_MARKER") == "$(scram_marker_text)" ]] && return 0
    log "Kafka: creating the SCRAM-SHA-512 user $KAFKA_SCRAM_USER ..."
    find_java
    if ! "$JAVA" -Xmx256m -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_LOG4J_TOOLS" \
        -cp "$KAFKA_LIBS/*" kafka.admin.ConfigCommand --bootstrap-server "$KAFKA_BROKERS" --alter \
        --add-config "SCRAM-SHA-512=[password=$(<"$KAFKA_SCRAM_PASSWORD_FILE")]" \
        --entity-type users --entity-name "$KAFKA_SCRAM_USER" >"$KAFKA_DIR/scram.log" 2>&1 </dev/null 9>&-; then
        show_log_tail "$KAFKA_DIR/scram.log" 20
        die "could not create the Kafka SCRAM user"
    fi
    scram_marker_text >"$KAFKA_SCRAM_MARKER"
}

# A cluster id is a base64url-encoded random UUID (22 chars), what `kafka-storage random-uuid`
# prints; Kafka avoids ids starting with '-' (they look like CLI flags).
new_cluster_id() {
    local id
    while :; do
        id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
        [[ $id == -* ]] || break
    done
    echo "$id"
}

format_kafka_storage_once() {
    [[ -f $KAFKA_DATA/meta.properties ]] && return 0
    [[ -s $KAFKA_CLUSTER_ID_FILE ]] || new_cluster_id >"$KAFKA_CLUSTER_ID_FILE"
    local cluster_id
    cluster_id=$(<"$KAFKA_CLUSTER_ID_FILE")
    log "formatting Kafka storage in $KAFKA_DATA (cluster id $cluster_id) ..."
    # Fresh storage gets the SCRAM credential in its first metadata records.
    if ! kafka_java -Xmx256m kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" \
        --add-scram "SCRAM-SHA-512=[name=$KAFKA_SCRAM_USER,password=$(<"$KAFKA_SCRAM_PASSWORD_FILE")]" \
        >>"$KAFKA_LOG" 2>&1 </dev/null 9>&-; then
        show_log_tail "$KAFKA_LOG" 20
        die "formatting the Kafka storage failed"
    fi
    scram_marker_text >"$KAFKA_SCRAM_MARKER"
}

start_kafka() {
    local port
    for port in "$KAFKA_SECURE_PORT" "$KAFKA_CONTROLLER_PORT"; do
        if tcp_open "$KAFKA_HOST" "$port"; then
            die "port $port (Kafka secured listener or controller) is taken by $(port_owner "$port")"
        fi
    done
    find_java
    write_kafka_props
    format_kafka_storage_once
    # Keep the log from growing forever on a long-lived machine: one old generation is kept.
    if [[ -f $KAFKA_LOG ]] && (($(stat -c %s -- "$KAFKA_LOG") > 50 * 1024 * 1024)); then
        mv -f -- "$KAFKA_LOG" "$KAFKA_LOG.1"
    fi
    touch -- "$KAFKA_LOG"
    stat -c %s -- "$KAFKA_LOG" >"$KAFKA_LOG_OFFSET_FILE"
    log "starting Kafka $KAFKA_VERSION (log: $KAFKA_LOG) ..."
    # setsid: own session, so the broker survives this script, the terminal and Ctrl-C in it.
    # Running setsid from a non-interactive script, it execs java in place, so $! is java's pid.
    setsid "$JAVA" "${KAFKA_HEAP_OPTS[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$KAFKA_LOG4J" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
        >>"$KAFKA_LOG" 2>&1 </dev/null 9>&- &
    echo $! >"$KAFKA_PID_FILE"
}

# Print what the current broker logged since it was started (not older runs' lines).
show_kafka_log_tail() {
    local offset=0
    [[ -f $KAFKA_LOG_OFFSET_FILE ]] && offset=$(<"$KAFKA_LOG_OFFSET_FILE")
    printf 'stack: last lines of %s (this start):\n' "$KAFKA_LOG" >&2
    tail -c "+$((offset + 1))" -- "$KAFKA_LOG" | tail -n 40 | sed 's/^/  | /' >&2
}

wait_kafka_ready() {
    local deadline=$((SECONDS + KAFKA_START_TIMEOUT)) pid
    pid=$(<"$KAFKA_PID_FILE")
    while :; do
        # Only "alive" here, not kafka_our_pid: right after the launch the child may not have
        # exec'd java yet, so its command line is not the broker's for a few milliseconds.
        if ! alive "$pid"; then
            show_kafka_log_tail
            die "the Kafka broker exited during start-up"
        fi
        if kafka_logged_ready && tcp_open "$KAFKA_HOST" "$KAFKA_PORT" && tcp_open "$KAFKA_HOST" "$KAFKA_SECURE_PORT"; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            show_kafka_log_tail
            die "Kafka did not become ready on $KAFKA_BROKERS within ${KAFKA_START_TIMEOUT}s (broker pid $(<"$KAFKA_PID_FILE") left running; 'scripts/stack down' stops it)"
        fi
        sleep "$POLL_INTERVAL"
    done
}

ensure_kafka() {
    ensure_kafka_libs
    ensure_kafka_client_props
    local pid
    if pid=$(kafka_our_pid) && ! kafka_props_current; then
        # Started by an older scripts/stack: restart it with the secured listener (data kept).
        log "Kafka: the running broker lacks the current settings (secured listener); restarting it ..."
        stop_kafka
        pid=""
    fi
    if [[ -n $pid ]]; then
        wait_kafka_ready
    elif tcp_open "$KAFKA_HOST" "$KAFKA_PORT"; then
        log "Kafka: reusing the server already on $KAFKA_BROKERS (not started by scripts/stack; $(port_owner "$KAFKA_PORT")); its secured listener, if any, is not ours"
        return 0
    else
        rm -f -- "$KAFKA_PID_FILE"
        start_kafka
        wait_kafka_ready
        pid=$(<"$KAFKA_PID_FILE")
    fi
    ensure_scram_user
    log "Kafka is up (pid $pid, $KAFKA_BROKERS, SASL_SSL $KAFKA_SECURE_BROKERS, data $KAFKA_DATA)"
}

stop_kafka() {
    local pid
    if ! pid=$(kafka_our_pid); then
        rm -f -- "$KAFKA_PID_FILE"
        if tcp_open "$KAFKA_HOST" "$KAFKA_PORT"; then
            log "Kafka: the server on $KAFKA_BROKERS was not started by scripts/stack; leaving it alone"
        else
            log "Kafka is not running"
        fi
        return 0
    fi
    log "stopping Kafka (pid $pid) ..."
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            log "Kafka did not stop within ${KAFKA_STOP_TIMEOUT}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            # A killed process is gone at once, but give the kernel a moment to reap it.
            local kill_deadline=$((SECONDS + 5))
            while alive "$pid" && ((SECONDS < kill_deadline)); do sleep 0.1; done
            break
        fi
        sleep "$POLL_INTERVAL"
    done
    alive "$pid" && die "Kafka (pid $pid) is still running"
    rm -f -- "$KAFKA_PID_FILE"
    log "Kafka stopped"
}

# One status line; fails when Kafka is not usable.
kafka_status() {
    local pid
    if pid=$(kafka_our_pid) && tcp_open "$KAFKA_HOST" "$KAFKA_PORT"; then
        if tcp_open "$KAFKA_HOST" "$KAFKA_SECURE_PORT"; then
            echo "kafka:    running (pid $pid, $KAFKA_BROKERS, SASL_SSL $KAFKA_SECURE_BROKERS, data $KAFKA_DATA)"
        else
            echo "kafka:    running (pid $pid, $KAFKA_BROKERS, data $KAFKA_DATA) without the secured listener on $KAFKA_SECURE_BROKERS ('scripts/stack up' restarts it with one)"
        fi
    elif [[ -n ${pid:-} ]]; then
        echo "kafka:    process $pid runs but does not accept connections on $KAFKA_BROKERS (starting?)"
        return 3
    elif tcp_open "$KAFKA_HOST" "$KAFKA_PORT"; then
        echo "kafka:    running, not started by scripts/stack ($KAFKA_BROKERS, $(port_owner "$KAFKA_PORT"))"
    else
        echo "kafka:    not running"
        return 3
    fi
}
