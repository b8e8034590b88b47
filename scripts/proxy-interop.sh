#!/usr/bin/env bash
# Checks ringlb's PROXY protocol against real parsers, not only its own:
#   - send_proxy v1 and v2 to nginx (listen ... proxy_protocol) and to HAProxy (accept-proxy),
#     from IPv4 and IPv6 clients: each answers with the client address it read from the header;
#   - accept_proxy behind HAProxy (server ... send-proxy-v2): ringlb takes the client address
#     from HAProxy's header and passes it on to nginx.
# Installs nginx and haproxy (apt-get, as root) when missing; runs its own instances on its own
# ports and stops them on exit. Usage: scripts/proxy-interop.sh [RINGLB_BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/install.sh
. scripts/lib/ports.sh
ringlb=${1:-${RINGLB_BIN:-target/release/ringlb}}
[ -x "$ringlb" ] || { echo "no ringlb binary at $ringlb (build with: cargo build --release)" >&2; exit 1; }

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v haproxy >/dev/null || missing+=(haproxy)
install_missing "nginx haproxy" "${missing[@]}"

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 100); do
        python3 -c "import socket,sys; socket.create_connection(('$1', $2), timeout=0.2)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1:$2" >&2
    return 1
}

all_ports=$(free_ports 9)
read -r nginx_port haproxy_port front_port ringlb_accept_port p0 p1 p2 p3 p4 <<<"$all_ports"
ports=("$p0" "$p1" "$p2" "$p3" "$p4")
# nginx answers with the address its PROXY parser read.
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
    server {
        listen 127.0.0.1:$nginx_port proxy_protocol;
        location / { return 200 "nginx saw \$proxy_protocol_addr \$proxy_protocol_port\n"; }
    }
}
CONF
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" & pids+=($!)

# HAProxy answers with the address its accept-proxy read, and also fronts ringlb with
# send-proxy-v2 for the accept_proxy check.
cat > "$work/haproxy.cfg" <<CONF
global
    log stderr format raw local0 err
defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s
frontend answer
    bind 127.0.0.1:$haproxy_port accept-proxy
    http-request return status 200 content-type text/plain lf-string "haproxy saw %[src] %[src_port]\n"
frontend front
    mode tcp
    bind 127.0.0.1:$front_port
    default_backend to_ringlb
backend to_ringlb
    mode tcp
    server ringlb 127.0.0.1:$ringlb_accept_port send-proxy-v2
CONF
haproxy -f "$work/haproxy.cfg" -db & pids+=($!)

cat > "$work/ringlb.toml" <<CONF
workers = 2
[listeners.v1_nginx]
bind = "127.0.0.1:${ports[0]}"
pool = "v1_nginx"
[listeners.v2_nginx]
bind = "[::1]:${ports[1]}"
pool = "v2_nginx"
[listeners.v1_haproxy]
bind = "[::1]:${ports[2]}"
pool = "v1_haproxy"
[listeners.v2_haproxy]
bind = "127.0.0.1:${ports[3]}"
pool = "v2_haproxy"
[listeners.behind_haproxy]
bind = "127.0.0.1:$ringlb_accept_port"
pool = "v1_nginx"
accept_proxy = true

[pools.v1_nginx]
send_proxy = "v1"
backends = [{ address = "127.0.0.1:$nginx_port" }]
[pools.v2_nginx]
send_proxy = "v2"
backends = [{ address = "127.0.0.1:$nginx_port" }]
[pools.v1_haproxy]
send_proxy = "v1"
backends = [{ address = "127.0.0.1:$haproxy_port" }]
[pools.v2_haproxy]
send_proxy = "v2"
backends = [{ address = "127.0.0.1:$haproxy_port" }]
CONF
"$ringlb" run -c "$work/ringlb.toml" 2> "$work/ringlb.log" & pids+=($!)

wait_port 127.0.0.1 "$nginx_port"; wait_port 127.0.0.1 "$haproxy_port"; wait_port 127.0.0.1 "$front_port"
wait_port 127.0.0.1 "${ports[0]}"; wait_port ::1 "${ports[1]}"

# request SOURCE_IP HOST PORT: an HTTP request from SOURCE_IP; prints "<source port> <body>".
request() {
    python3 - "$@" <<'PY'
import socket, sys
source, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(5)
s.bind((source, 0))
s.connect((host, port))
s.sendall(b"GET / HTTP/1.0\r\nHost: interop\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(s.getsockname()[1], data.split(b"\r\n\r\n", 1)[-1].decode().strip())
PY
}

failures=0
check() { # NAME SOURCE HOST PORT PARSER
    local name=$1 source=$2 host=$3 port=$4 parser=$5 out sport body
    out=$(request "$source" "$host" "$port") || { echo "FAIL $name: request failed"; failures=$((failures+1)); return; }
    sport=${out%% *}; body=${out#* }
    if [ "$body" = "$parser saw $source $sport" ]; then
        echo "ok   $name: $body"
    else
        echo "FAIL $name: expected \"$parser saw $source $sport\", got \"$body\""
        failures=$((failures+1))
    fi
}
check "send_proxy v1 -> nginx (IPv4 client)" 127.0.1.77 127.0.0.1 "${ports[0]}" nginx
check "send_proxy v2 -> nginx (IPv6 client)" ::1 ::1 "${ports[1]}" nginx
check "send_proxy v1 -> haproxy (IPv6 client)" ::1 ::1 "${ports[2]}" haproxy
check "send_proxy v2 -> haproxy (IPv4 client)" 127.0.1.78 127.0.0.1 "${ports[3]}" haproxy

# accept_proxy: the client's address comes from HAProxy's v2 header, not from the connection
# (which is HAProxy's own); the source port is the one the client used towards HAProxy.
check "accept_proxy behind haproxy send-proxy-v2 -> ringlb -> v1 -> nginx" 127.0.1.79 127.0.0.1 "$front_port" nginx

if [ "$failures" -gt 0 ]; then
    echo "$failures interop checks failed; ringlb log:"; cat "$work/ringlb.log"
    exit 1
fi
echo "all PROXY protocol interop checks passed (nginx $(nginx -v 2>&1 | cut -d/ -f2), $(haproxy -v | head -1 | cut -d' ' -f1-3))"
