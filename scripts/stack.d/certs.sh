# scripts/stack.d/certs.sh — the local CA and the server certificate that the secured Kafka
# listener and Postgres present (sourced, not run). Made once with openssl; kept in
# $STACK_DIR/certs.
# shellcheck shell=bash

CERT_DIR=$STACK_DIR/certs
CA_CERT=$CERT_DIR/ca.pem
CA_KEY=$CERT_DIR/ca.key
SERVER_CERT=$CERT_DIR/server.pem
SERVER_KEY=$CERT_DIR/server.key
# Key and certificate in one PEM file: what Kafka's `ssl.keystore.type=PEM` reads.
SERVER_KEYSTORE=$CERT_DIR/server-keystore.pem

ensure_certs() {
    if [[ -s $CA_CERT && -s $SERVER_CERT && -s $SERVER_KEY && -s $SERVER_KEYSTORE ]]; then
        return 0
    fi
    command -v openssl >/dev/null || apt_install openssl
    log "making a local CA and a server certificate (IP 127.0.0.1, DNS localhost) in $CERT_DIR ..."
    # Made in a temp dir and renamed, so that an interrupted run never leaves half a CA.
    mkdir -p -- "$STACK_DIR"
    local tmp
    tmp=$(mktemp -d -- "$STACK_DIR/certs.tmp.XXXXXX")
    CLEANUP_PATHS+=("$tmp")
    {
        openssl req -x509 -new -nodes -newkey rsa:2048 -sha256 -days 3650 \
            -subj "/CN=stripe-pipeline local CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout "$tmp/ca.key" -out "$tmp/ca.pem" &&
            openssl req -new -nodes -newkey rsa:2048 -sha256 -subj "/CN=localhost" \
                -keyout "$tmp/server.key" -out "$tmp/server.csr" &&
            printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
                "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
                >"$tmp/server.ext" &&
            openssl x509 -req -sha256 -days 825 -in "$tmp/server.csr" -CA "$tmp/ca.pem" \
                -CAkey "$tmp/ca.key" -CAcreateserial -extfile "$tmp/server.ext" -out "$tmp/server.pem"
    } >"$tmp/openssl.log" 2>&1 || {
        show_log_tail "$tmp/openssl.log"
        die "openssl could not make the certificates"
    }
    cat -- "$tmp/server.key" "$tmp/server.pem" >"$tmp/server-keystore.pem"
    rm -f -- "$tmp/server.csr" "$tmp/server.ext" "$tmp/ca.srl" "$tmp/openssl.log"
    chmod 600 -- "$tmp/ca.key" "$tmp/server.key" "$tmp/server-keystore.pem"
    chmod 644 -- "$tmp/ca.pem" "$tmp/server.pem"
    chmod 755 -- "$tmp"
    rm -rf -- "$CERT_DIR"
    mv -- "$tmp" "$CERT_DIR"
}
