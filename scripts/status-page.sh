#!/usr/bin/env bash
# Loads ringlb's status page (GET / on metrics_bind) in headless chromium against a running
# ringlb with one backend up (its weight set at run time) and one down, and checks what the
# page shows in the DOM chromium dumps after the page's script ran. Writes the DOM and a
# screenshot to --out (default: a temporary directory, removed unless --keep). CI runs it.
#
#   scripts/status-page.sh [--out DIR]
#
# Needs the release build (cargo build --release --bins; RINGLB_BIN overrides the binary),
# python3, and chromium: installed with apt-get when missing and run as root.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
RINGLB_BIN=${RINGLB_BIN:-$root/target/release/ringlb}
BACKEND_BIN=${BACKEND_BIN:-$(dirname "$RINGLB_BIN")/ringlb-demo-backend}
out=''
while (($#)); do
    case $1 in
        --out) out=$2; shift 2 ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "status-page.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "status-page.sh: $*" >&2; exit 1; }
log() { echo "status-page.sh: $*"; }

for bin in "$RINGLB_BIN" "$BACKEND_BIN"; do
    [[ -x $bin ]] || die "$bin is missing; build it with: cargo build --release --bins"
done
command -v python3 >/dev/null || die "python3 is missing"

browser=''
find_browser() {
    local b
    for b in chromium chromium-browser google-chrome; do
        if command -v "$b" >/dev/null; then browser=$b; return 0; fi
    done
    return 1
}
if ! find_browser; then
    ((EUID == 0)) || die "chromium is missing; run as root to install it, or: sudo apt-get install chromium"
    command -v apt-get >/dev/null || die "chromium is missing and there is no apt-get to install it"
    log "installing chromium (apt-get)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends chromium >/dev/null ||
        die "apt-get could not install chromium"
    find_browser || die "chromium is missing after install"
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
[[ -n $out ]] || out=$tmp/out
mkdir -p "$out"

. "$root/scripts/lib/ports.sh"
ports=$(free_ports 4)
read -r listen metrics up down <<<"$ports"

cat >"$tmp/ringlb.toml" <<EOF
workers = 2
metrics_bind = "127.0.0.1:$metrics"
admin_socket = "$tmp/admin.sock"

[listeners.web]
bind = "127.0.0.1:$listen"
pool = "web"

[pools.web]
backends = [{ address = "127.0.0.1:$up" }, { address = "127.0.0.1:$down" }]
[pools.web.health]
interval = "200ms"
timeout = "200ms"
rise = 1
fall = 1
EOF

"$BACKEND_BIN" "127.0.0.1:$up" >"$tmp/backend.log" 2>&1 &
pids+=($!)
"$RINGLB_BIN" run -c "$tmp/ringlb.toml" >"$tmp/ringlb.log" 2>&1 &
pids+=($!)
ringlb_pid=$!

get() { # get PATH: the body of GET http://127.0.0.1:$metrics/PATH, or nothing
    python3 -c 'import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
except Exception:
    pass' "http://127.0.0.1:$metrics/$1"
}
# Wait until ringlb serves, has seen the first backend up and marked the second down.
healthy() {
    local text
    text=$(get metrics)
    grep -q "ringlb_backend_up{pool=\"web\",backend=\"127.0.0.1:$up\"} 1" <<<"$text" &&
        grep -q "ringlb_backend_up{pool=\"web\",backend=\"127.0.0.1:$down\"} 0" <<<"$text"
}
for _ in $(seq 1 100); do
    if healthy; then break; fi
    kill -0 "$ringlb_pid" 2>/dev/null || { cat "$tmp/ringlb.log" >&2; die "ringlb exited"; }
    sleep 0.2
done
healthy || { cat "$tmp/ringlb.log" "$tmp/backend.log" >&2; die "the backends never showed one up and one down"; }
"$RINGLB_BIN" ctl --socket "$tmp/admin.sock" weight web "127.0.0.1:$up" 3 >/dev/null ||
    die "ringlb ctl weight failed"
# Traffic for the charts, until ringlb has taken two samples (one rate; a sample every 5 s).
python3 - "$listen" "$metrics" <<'EOF' || { cat "$tmp/ringlb.log" "$tmp/backend.log" >&2; die "no rates in /status.json"; }
import json, socket, sys, time, urllib.request
listen, metrics = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", listen), timeout=5) as s:
            s.sendall(b"hello status page\n")
            s.recv(64)
    status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{metrics}/status.json", timeout=5))
    if status["rates"] and status["rates"][-1][1] > 0:
        sys.exit(0)
    time.sleep(0.2)
sys.exit("status.json had no rate after 30 s")
EOF

log "loading http://127.0.0.1:$metrics/ in $browser"
"$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
    --user-data-dir="$tmp/profile" --virtual-time-budget=10000 --dump-dom "http://127.0.0.1:$metrics/" \
    >"$out/status.html" 2>"$tmp/browser.log" || { cat "$tmp/browser.log" >&2; die "$browser failed"; }
"$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
    --user-data-dir="$tmp/profile" --virtual-time-budget=10000 --window-size=1280,900 \
    --screenshot="$out/status.png" "http://127.0.0.1:$metrics/" >/dev/null 2>>"$tmp/browser.log" ||
    die "$browser could not take a screenshot"

dom=$out/status.html
failed=0
expect() { # expect DESCRIPTION PATTERN: the dumped DOM matches the extended regex
    if grep -Eq -- "$2" "$dom"; then
        log "ok: $1"
    else
        log "FAILED: $1 (no match for: $2)"
        failed=1
    fi
}
expect "the page's script ran and rendered" 'data-loaded="yes"'
expect "the process is named" "pid $ringlb_pid"
expect "the listener is listed" '<tr class="listener" data-name="web">'
expect "the up backend shows up" "data-address=\"127.0.0.1:$up\" data-health=\"up\""
expect "the down backend shows down" "data-address=\"127.0.0.1:$down\" data-health=\"down\""
expect "the weight set at run time shows" '<td class="num">3</td>'
expect "the run-time setting is marked" 'set at run time'
expect "the down backend's failed check shows" 'failed: connection refused'
expect "four charts" '(data-chart=[^>]*>.*){4}'
expect "the charts have a line" '<path d="M'
expect "the connection rate has a value" 'connections/s: <span class="now">[0-9]'
expect "no error refreshing" '<div id="error"></div>'
[[ -s $out/status.png ]] || { log "FAILED: no screenshot"; failed=1; }
((failed == 0)) || { cat "$tmp/browser.log" >&2; die "the status page does not show what it should (DOM in $out/status.html)"; }
log "the status page shows every listener, backend, health, run-time setting and chart"
