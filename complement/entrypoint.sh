#!/bin/sh
# Starts Plaza the way Complement expects: the server name from SERVER_NAME, a federation
# certificate for that name issued by the CA Complement mounts at /complement/ca, that CA
# trusted for outgoing federation, open registration and test-sized rate limits.
set -eu

: "${SERVER_NAME:?SERVER_NAME must be set}"
# The paths and addresses can be moved (the test suite runs this script outside a container);
# these names avoid the PLAZA_ prefix, which the server reads as configuration.
CA_DIR="${COMPLEMENT_CA_DIR:-/complement/ca}"
DATA="${DATA_DIR:-/data}"
PLAZA="${SERVER_BINARY:-/usr/local/bin/plaza}"
CLIENT_LISTEN="${CLIENT_LISTEN:-0.0.0.0:8008}"
FEDERATION_LISTEN="${FEDERATION_LISTEN:-0.0.0.0:8448}"
mkdir -p "$DATA/tls"

# A key and a certificate for SERVER_NAME (a host name, possibly with a port), signed by
# Complement's CA.
host="${SERVER_NAME%:*}"
openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$host" \
    -keyout "$DATA/tls/server.key" -out "$DATA/tls/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s\n' "$host" > "$DATA/tls/ext.cnf"
openssl x509 -req -in "$DATA/tls/server.csr" -CA "$CA_DIR/ca.crt" -CAkey "$CA_DIR/ca.key" \
    -CAcreateserial -CAserial "$DATA/tls/ca.srl" -days 2 -sha256 \
    -extfile "$DATA/tls/ext.cnf" -out "$DATA/tls/server.crt" 2>/dev/null

cat > "$DATA/plaza.toml" <<CONFIG
server_name = "$SERVER_NAME"
listen = ["$CLIENT_LISTEN"]

[database]
path = "$DATA/db"
cache_mb = 32

[registration]
mode = "open"
shared_secret = "complement"
allow_guests = true

[outbound]
allow_private_addresses = true

[federation]
enabled = true
listen = ["$FEDERATION_LISTEN"]
tls_cert = "$DATA/tls/server.crt"
tls_key = "$DATA/tls/server.key"
extra_ca_file = "$CA_DIR/ca.crt"

[limits]
rate_per_second = 1000
rate_burst = 10000

[limits.login_failures]
per_second = 1000.0
burst = 10000

[limits.registration]
per_second = 1000.0
burst = 10000

[limits.messages]
per_second = 1000.0
burst = 10000

[log]
filter = "info"
CONFIG

export PLAZA_CONFIG="$DATA/plaza.toml"
exec "$PLAZA" serve
