#!/usr/bin/env bash
# Load test: ringlb (its defaults, the copy and splice relays, and spread = "pack") against
# HAProxy (mode tcp) and nginx's stream module, with the same backends and the same load, the
# targets back to back in every round; reports medians, the proxy's own CPU per GB / per
# request, and memory per idle connection. See `--help`.
set -euo pipefail

readonly SCRIPT_NAME=scripts/bench.sh
usage() {
    cat <<'EOF'
Usage: scripts/bench.sh [--quick] [--rounds N] [--duration SECONDS] [--warmup S] [--pause S]
                        [--targets LIST] [--scenarios LIST] [--out DIR] [--idle-conns N]
                        [--proxy-threads N] [--layout dedicated|shared] [--rate N]
                        [--close-rate N] [--alt-config TOML]

Runs the same load through the targets and writes DIR/results.md, results.json and
results.svg (DIR defaults to bench-results/ in the repository).

Targets (default: all but ringlb-alt, in this order in every round):
  direct         straight to one backend: the limit of this machine
  ringlb         $RINGLB_BIN (default target/release/ringlb), workers = P, least_conn,
                 the default relay (auto: copy; splice once a direction fills a buffer)
  ringlb-copy    the same binary and configuration, but relay = "copy"
  ringlb-splice  the same, but relay = "splice"
  ringlb-pack    the same, default relay, but spread = "pack": as few workers as keep up
                 take connections (the default, "even", gives each worker its share)
  ringlb-nolog   the same as ringlb, but connection_log = false (ringlb logs a line per
                 connection by default, to a file here; HAProxy and nginx here log none)
  ringlb-alt     only when named: $RINGLB_ALT_BIN (default: $RINGLB_BIN) with the ringlb
                 configuration plus the --alt-config lines; for trying a change or a setting
                 side by side with ringlb (the report adds its ratio to ringlb)
  haproxy        HAProxy, mode tcp, balance leastconn, nbthread = P
  nginx          nginx stream module, least_conn, worker_processes = P
P is --proxy-threads: the same number of threads (processes for nginx) for every proxy.
Ratios are to the best peer, the better of haproxy and nginx; each ringlb target is compared
with that peer, and ringlb-alt with ringlb too.

Scenarios (default: all):
  idle       hold N connections (default 5000) through the proxy to Redis: RSS per connection
  bulk       100 MiB downloads on 4 connections (wrk): GB/s, proxy CPU seconds per GB
  keepalive  100-byte requests on 50 keep-alive connections (wrk): req/s, p50, p99, CPU/request
  connclose  one TCP connection per request, 50 at a time (wrk, Connection: close): conn/s
  redis      redis-benchmark -t set,get -c 50: req/s, p50, p99, CPU/request
  fixedrate  100-byte keep-alive requests sent on a schedule, so that every proxy gets the
             same offered load: 60% of the slowest proxy's keep-alive req/s in this run (or
             --rate); CPU/request, p50, p99 at that rate (a run that serves less than 90%
             of it is flagged). Runs after the other scenarios.
  fixedclose the same with one connection per request (Connection: close): 60% of the
             slowest proxy's connclose conn/s in this run (or --close-rate); CPU/connection,
             p50, p99 at that rate.

Layout (--layout):
  dedicated  (default) the proxies run on the last half of the CPUs (the last one of 2), one
             thread each, under taskset; wrk, redis-benchmark and the backends on the others.
             As a balancer is deployed: on cores of its own.
  shared     everything on every CPU, the proxies with one thread per CPU (the layout of
             earlier reports).
Every scenario also records the proxy's busy share: its CPU time over the wall time of the
cores it has (how much headroom is left).

Order: every proxy is started once and runs to the end. Each round runs each scenario through
every target back to back, the targets in an order rotated from round to round; the report's
ratios are medians of per-round ratios, so noise from elsewhere on the machine that lasts a
minute weighs on every target alike.

Options:
  --quick            1 round, 3 s per scenario (finishes in under 3 minutes)
  --rounds N         rounds; each figure is the median over them (default 3)
  --duration S       seconds of load per scenario (default 10)
  --warmup S         seconds of unmeasured load before each wrk scenario (default 1; 0 quick)
  --pause S          seconds without load between scenarios (default 3; 1 quick): a proxy
                     that adapts to its load starts each scenario settled, not in the state
                     the previous scenario left it in. ringlb's spread = "pack" takes one
                     worker out of use per 2 s without work: 3 s settles 2 workers, N workers
                     need 2(N-1) s; the quick default does not settle them
  --idle-conns N     connections held in the idle scenario (default 5000; fewer, for every
                     target, if the hard open-file limit is too low)
  --out DIR          where the results go (default bench-results/)
  --proxy-threads P  threads of every proxy: ringlb workers, HAProxy nbthread, nginx
                     worker_processes (default: one per CPU the proxies have in the layout)
  --layout L         dedicated (default) or shared, above
  --rate N           fixedrate: the requests/s to offer (default: 60% of the slowest proxy's
                     keep-alive req/s, median over the rounds)
  --close-rate N     fixedclose: the connections/s to offer (default: 60% of the slowest
                     proxy's connclose conn/s, median over the rounds)
  --alt-config TOML  top-level settings added to ringlb-alt's configuration, e.g.
                     'relay = "copy"' (not workers, connect_timeout, idle_timeout or
                     drain_timeout, which the bench sets)

Environment: RINGLB_BIN (the ringlb binary of the five ringlb targets), RINGLB_ALT_BIN (that of
ringlb-alt; default RINGLB_BIN), BENCH_PORT_BASE (default 17000; ports BASE+1 to BASE+92 on
127.0.0.1 are used). Missing tools (haproxy, nginx,
libnginx-mod-stream, wrk, redis-server, redis-tools) are installed with apt-get when run as
root; the services those packages would start are stopped and disabled. Every process the
bench starts is stopped on exit, Ctrl-C included.
EOF
}

orig_pwd=$PWD
cmdline=$0
for arg in "$@"; do # as typed; quoted only where the shell would need it
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then cmdline+=" $arg"; else cmdline+=" $(printf '%q' "$arg")"; fi
done
cd "$(dirname "$0")/.."
root=$PWD
bench_dir=$root/scripts/bench

# ---------------------------------------------------------------- options

all_targets=(direct ringlb ringlb-copy ringlb-splice ringlb-pack ringlb-nolog ringlb-alt haproxy nginx)
ringlb_targets=(ringlb ringlb-copy ringlb-splice ringlb-pack ringlb-nolog ringlb-alt)
all_scenarios=(idle bulk keepalive connclose redis fixedrate fixedclose)
quick=0 rounds='' duration='' warmup='' pause='' idle_conns=5000 out='' proxy_threads='' layout=dedicated rate=''
close_rate=''
alt_config=''
targets_arg=$(IFS=,; echo "${all_targets[*]/ringlb-alt/}" | tr -s ,)
scenarios_arg=$(IFS=,; echo "${all_scenarios[*]}")

die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

while (($#)); do
    opt=$1 val=''
    case $opt in
        --*=*) val=${opt#*=}; opt=${opt%%=*} ;;
        --rounds | --duration | --warmup | --pause | --targets | --scenarios | --out | --idle-conns | --proxy-threads | --layout | --rate | --close-rate | --alt-config)
            (($# >= 2)) || die "$opt needs a value"
            val=$2; shift ;;
    esac
    case $opt in
        --quick) quick=1 ;;
        --rounds) rounds=$val ;;
        --duration) duration=$val ;;
        --warmup) warmup=$val ;;
        --pause) pause=$val ;;
        --targets) targets_arg=$val ;;
        --scenarios) scenarios_arg=$val ;;
        --out) out=$val ;;
        --idle-conns) idle_conns=$val ;;
        --proxy-threads) proxy_threads=$val ;;
        --layout) layout=$val ;;
        --rate) rate=$val ;;
        --close-rate) close_rate=$val ;;
        --alt-config) alt_config=$val ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

if ((quick)); then
    : "${rounds:=1}" "${duration:=3}" "${warmup:=0}" "${pause:=1}"
else
    : "${rounds:=3}" "${duration:=10}" "${warmup:=1}" "${pause:=3}"
fi
for n in rounds duration idle_conns; do
    [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "--${n/_/-} must be a whole number above 0, not '${!n}'"
done
[[ $warmup =~ ^[0-9]+$ ]] || die "--warmup must be a whole number of seconds, not '$warmup'"
[[ $pause =~ ^[0-9]+$ ]] || die "--pause must be a whole number of seconds, not '$pause'"

# pick WHAT LIST CHOICES...: sets `picked` to the CHOICES named in the comma-separated LIST,
# in the order of CHOICES (the canonical order, whatever order LIST has).
pick() {
    local what=$1 list=",$2," c given=()
    shift 2
    IFS=, read -r -a given <<<"${list:1:${#list}-2}"
    for c in "${given[@]}"; do
        [[ -n $c ]] || continue
        [[ " $* " == *" $c "* ]] || die "unknown $what '$c'; choose from: $*"
    done
    picked=()
    for c in "$@"; do [[ $list == *",$c,"* ]] && picked+=("$c"); done
    ((${#picked[@]})) || die "no $what chosen"
}
pick target "$targets_arg" "${all_targets[@]}"
targets=("${picked[@]}")
pick scenario "$scenarios_arg" "${all_scenarios[@]}"
scenarios=("${picked[@]}")
wants() { [[ " $2 " == *" $1 "* ]]; } # wants WORD "LIST"
wants_ringlb() {
    local t
    for t in "${ringlb_targets[@]}"; do wants "$t" "${targets[*]}" && return 0; done
    return 1
}

abspath() { # relative to where the bench was started from
    if [[ $1 == /* ]]; then echo "$1"; else echo "$orig_pwd/$1"; fi
}
out=$(abspath "${out:-$root/bench-results}")
binary_path() { # a relative path from where the bench was started, else from the repository
    if [[ $1 == /* ]]; then echo "$1"; elif [[ -e $orig_pwd/$1 ]]; then echo "$orig_pwd/$1"; else echo "$root/$1"; fi
}
RINGLB_BIN=$(binary_path "${RINGLB_BIN:-target/release/ringlb}")
if wants_ringlb; then
    [[ -x $RINGLB_BIN ]] ||
        die "no ringlb binary at $RINGLB_BIN: build it (cargo build --release --bins, or make bench) or set RINGLB_BIN"
fi
RINGLB_ALT_BIN=$(binary_path "${RINGLB_ALT_BIN:-$RINGLB_BIN}")
if wants ringlb-alt "${targets[*]}"; then
    [[ -x $RINGLB_ALT_BIN ]] || die "no ringlb binary at $RINGLB_ALT_BIN (RINGLB_ALT_BIN, for ringlb-alt)"
elif [[ -n $alt_config ]]; then
    die "--alt-config is for the ringlb-alt target; add it to --targets"
fi

ncpu=$(nproc)
# CPU lists (taskset -c) for the proxies and for the load and backends; empty: any CPU.
proxy_cpus='' load_cpus='' proxy_cores=$ncpu load_cores=$ncpu
case $layout in
    dedicated)
        ((ncpu >= 2)) || die "--layout dedicated needs 2 CPUs at least (this machine has $ncpu); use --layout shared"
        mapfile -t cpu_ids < <(taskset -cp $$ | sed 's/.*: //' | tr ',' '\n' |
            awk -F- '{ if (NF == 2) { for (i = $1; i <= $2; i++) print i } else print $1 }')
        ((${#cpu_ids[@]} >= 2)) || die "--layout dedicated needs 2 CPUs this process may run on; use --layout shared"
        proxy_cores=$((${#cpu_ids[@]} / 2))
        load_cores=$((${#cpu_ids[@]} - proxy_cores))
        proxy_cpus=$(IFS=,; echo "${cpu_ids[*]:load_cores}")
        load_cpus=$(IFS=,; echo "${cpu_ids[*]:0:load_cores}")
        ;;
    shared) ;;
    *) die "--layout must be dedicated or shared, not '$layout'" ;;
esac
if [[ -n $rate ]] && ! [[ $rate =~ ^[1-9][0-9]*$ ]]; then die "--rate must be a whole number of requests/s, not '$rate'"; fi
if [[ -n $close_rate ]] && ! [[ $close_rate =~ ^[1-9][0-9]*$ ]]; then
    die "--close-rate must be a whole number of connections/s, not '$close_rate'"
fi
: "${proxy_threads:=$proxy_cores}"
# Command prefixes: taskset execs the command, so a background job's pid is the program's.
on_proxy_cpus=() on_load_cpus=()
[[ -n $proxy_cpus ]] && on_proxy_cpus=(taskset -c "$proxy_cpus")
[[ -n $load_cpus ]] && on_load_cpus=(taskset -c "$load_cpus")
[[ $proxy_threads =~ ^[1-9][0-9]*$ ]] || die "--proxy-threads must be a whole number above 0, not '$proxy_threads'"
port_base=${BENCH_PORT_BASE:-17000}
if ! [[ $port_base =~ ^[0-9]+$ ]] || ((port_base < 1024 || port_base > 65000)); then
    die "BENCH_PORT_BASE must be a port number between 1024 and 65000"
fi
web_ports=($((port_base + 1)) $((port_base + 2)) $((port_base + 3)))
redis_ports=($((port_base + 11)) $((port_base + 12)))
declare -A web_port=([direct]=${web_ports[0]} [ringlb]=$((port_base + 21)) [haproxy]=$((port_base + 31))
    [nginx]=$((port_base + 41)) [ringlb-splice]=$((port_base + 51)) [ringlb-copy]=$((port_base + 61))
    [ringlb-pack]=$((port_base + 71)) [ringlb-nolog]=$((port_base + 81)) [ringlb-alt]=$((port_base + 91)))
declare -A redis_port=([direct]=${redis_ports[0]} [ringlb]=$((port_base + 22)) [haproxy]=$((port_base + 32))
    [nginx]=$((port_base + 42)) [ringlb-splice]=$((port_base + 52)) [ringlb-copy]=$((port_base + 62))
    [ringlb-pack]=$((port_base + 72)) [ringlb-nolog]=$((port_base + 82)) [ringlb-alt]=$((port_base + 92)))

needs_web=0 needs_redis=0
for s in "${scenarios[@]}"; do
    case $s in bulk | keepalive | connclose | fixedrate | fixedclose) needs_web=1 ;; redis | idle) needs_redis=1 ;; esac
done

# ---------------------------------------------------------------- cleanup

tmp=$(mktemp -d /tmp/ringlb-bench.XXXXXX)
chmod 755 "$tmp" # nginx workers (www-data or nobody) read the files served from here
declare -A pid_of=() target_pid_of=()
started=()          # names, in start order
runner_pid=''
temp_policy_rc=''

alive() { # alive PID: running, and not a zombie waiting to be reaped
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

stop_proc() { # stop_proc NAME: SIGTERM, up to 5 s, then SIGKILL
    local name=$1 pid=${pid_of[$1]:-} i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "$name (pid $pid) did not stop on SIGTERM within 5 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    unset "pid_of[$name]"
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM HUP
    if [[ -n $runner_pid ]]; then
        kill -TERM "$runner_pid" 2>/dev/null || true
        wait "$runner_pid" 2>/dev/null || true
    fi
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do
        stop_proc "${started[i]}"
    done
    [[ -n $temp_policy_rc ]] && rm -f "$temp_policy_rc"
    if [[ -d $out && -d $tmp/logs ]]; then # the servers' logs, for when something went wrong
        rm -rf "$out/logs"
        cp -r "$tmp/logs" "$out/logs" 2>/dev/null || true
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo; log "interrupted; stopping everything the bench started"; exit 130' INT TERM HUP

# ---------------------------------------------------------------- tools

# Stop and disable what a package we just installed would run as a system service.
stop_service() {
    local svc=$1
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    else
        if command -v service >/dev/null; then service "$svc" stop >/dev/null 2>&1 || true; fi
        if command -v update-rc.d >/dev/null; then update-rc.d "$svc" disable >/dev/null 2>&1 || true; fi
    fi
}

nginx_stream_ok() {
    command -v nginx >/dev/null || return 1
    local v
    v=$(nginx -V 2>&1)
    [[ $v == *"--with-stream "* || $v == *"--with-stream" ]] && return 0 # built in
    [[ -f $(nginx_modules_dir)/ngx_stream_module.so ]]
}
nginx_modules_dir() {
    local v
    v=$(nginx -V 2>&1)
    if [[ $v =~ --modules-path=([^ ]+) ]]; then echo "${BASH_REMATCH[1]}"; else echo /usr/lib/nginx/modules; fi
}

install_tools() {
    local missing=() pkg
    if ((needs_web)) || wants nginx "${targets[*]}"; then
        command -v nginx >/dev/null || missing+=(nginx)
    fi
    if wants nginx "${targets[*]}" && ! nginx_stream_ok; then missing+=(libnginx-mod-stream); fi
    if wants haproxy "${targets[*]}"; then command -v haproxy >/dev/null || missing+=(haproxy); fi
    ((needs_web)) && { command -v wrk >/dev/null || missing+=(wrk); }
    ((needs_redis)) && { command -v redis-server >/dev/null || missing+=(redis-server); }
    wants redis "${scenarios[*]}" && { command -v redis-benchmark >/dev/null || missing+=(redis-tools); }
    ((${#missing[@]})) || return 0

    local hint="apt-get install ${missing[*]}"
    ((EUID == 0)) || die "missing ${missing[*]}; run the bench as root to install them, or: sudo $hint"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and there is no apt-get to install them"
    log "installing ${missing[*]} (apt-get; log in $tmp/apt.log)"
    # Packages start their services on install unless policy-rc.d says no; say no for ours.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        temp_policy_rc=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\n# temporary, from ringlb %s\nexit 101\n' "$SCRIPT_NAME" >"$temp_policy_rc"
        chmod 755 "$temp_policy_rc"
    fi
    if ! { timeout 300 apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}"; } \
        >"$tmp/apt.log" 2>&1; then
        tail -n 15 "$tmp/apt.log" >&2
        die "apt-get could not install ${missing[*]} (see above)"
    fi
    if [[ -n $temp_policy_rc ]]; then rm -f "$temp_policy_rc"; temp_policy_rc=''; fi
    for pkg in "${missing[@]}"; do
        case $pkg in nginx | libnginx-mod-stream) stop_service nginx ;; haproxy) stop_service haproxy ;;
            redis-server) stop_service redis-server ;; esac
    done
}

check_tools() {
    local t
    for t in python3 timeout; do command -v "$t" >/dev/null || die "$t is required"; done
    if ((needs_web)) || wants nginx "${targets[*]}"; then command -v nginx >/dev/null || die "nginx is missing after install"; fi
    if wants nginx "${targets[*]}"; then nginx_stream_ok || die "nginx's stream module is missing (apt-get install libnginx-mod-stream)"; fi
    if wants haproxy "${targets[*]}"; then command -v haproxy >/dev/null || die "haproxy is missing after install"; fi
    if ((needs_web)); then command -v wrk >/dev/null || die "wrk is missing after install"; fi
    if ((needs_redis)); then command -v redis-server >/dev/null || die "redis-server is missing after install"; fi
    if wants redis "${scenarios[*]}"; then command -v redis-benchmark >/dev/null || die "redis-benchmark (redis-tools) is missing after install"; fi
}

# ---------------------------------------------------------------- processes

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

start_bg() { # start_bg NAME COMMAND...: run in the background, output to $tmp/logs/NAME.log
    local name=$1
    shift
    "$@" >"$tmp/logs/$name.log" 2>&1 </dev/null &
    pid_of[$name]=$!
    started+=("$name")
}

wait_ports() { # wait_ports NAME PORT...: until each accepts, or fail with the server's log
    local name=$1 port i
    shift
    for port in "$@"; do
        for ((i = 0; ; i++)); do
            port_open "$port" && break
            if ! alive "${pid_of[$name]}"; then
                tail -n 20 "$tmp/logs/$name.log" >&2
                die "$name exited before listening on 127.0.0.1:$port (its log is above)"
            fi
            ((i < 100)) || { tail -n 20 "$tmp/logs/$name.log" >&2; die "$name is not listening on 127.0.0.1:$port after 10 s"; }
            sleep 0.1
        done
    done
}

write_backend_configs() {
    mkdir -p "$tmp/www" "$tmp/nginx-backend" "$tmp/logs" "$tmp/conf"
    ((needs_web)) || return 0
    head -c 100 /dev/zero | tr '\0' 'x' >"$tmp/www/small.bin"
    head -c $((100 * 1024 * 1024)) /dev/zero >"$tmp/www/big.bin"
    chmod 644 "$tmp/www/"*
    cat "$tmp/www/big.bin" >/dev/null # into the page cache before anything is timed
    local listen='' p
    for p in "${web_ports[@]}"; do listen+="        listen 127.0.0.1:$p reuseport;"$'\n'; done
    cat >"$tmp/conf/nginx-backend.conf" <<EOF
# Backend web server: 100-byte /small.bin and 100 MiB /big.bin on ${web_ports[*]}.
worker_processes $load_cores;
worker_rlimit_nofile 20000;
daemon off;
pid $tmp/nginx-backend/nginx.pid;
error_log $tmp/logs/nginx-backend.error.log warn;
events { worker_connections 10000; }
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 1h;
    keepalive_requests 100000000;
    client_body_temp_path $tmp/nginx-backend/body;
    proxy_temp_path $tmp/nginx-backend/proxy;
    fastcgi_temp_path $tmp/nginx-backend/fastcgi;
    uwsgi_temp_path $tmp/nginx-backend/uwsgi;
    scgi_temp_path $tmp/nginx-backend/scgi;
    server {
${listen}        root $tmp/www;
    }
}
EOF
}

start_backends() {
    if ((needs_web)); then
        nginx -t -q -e "$tmp/logs/nginx-backend.error.log" -p "$tmp/nginx-backend/" -c "$tmp/conf/nginx-backend.conf" ||
            die "nginx rejected the backend configuration (above)"
        start_bg nginx-backend "${on_load_cpus[@]}" nginx -e "$tmp/logs/nginx-backend.error.log" -p "$tmp/nginx-backend/" -c "$tmp/conf/nginx-backend.conf"
        wait_ports nginx-backend "${web_ports[@]}"
        local got
        got=$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/${web_ports[0]}; printf 'GET /small.bin HTTP/1.0\r\n\r\n' >&3; cat <&3" | tail -c 100) || true
        [[ $got == "$(cat "$tmp/www/small.bin")" ]] || die "the backend nginx does not serve /small.bin (log: $tmp/logs/nginx-backend.error.log)"
    fi
    if ((needs_redis)); then
        local p
        for p in "${redis_ports[@]}"; do
            start_bg "redis-$p" "${on_load_cpus[@]}" redis-server --port "$p" --bind 127.0.0.1 --protected-mode no \
                --save '' --appendonly no --daemonize no --maxclients 10000 --dir "$tmp" --logfile ''
        done
        for p in "${redis_ports[@]}"; do wait_ports "redis-$p" "$p"; done
    fi
}

write_proxy_configs() {
    # Each proxy gets a web listener (least-connections over the 3 nginx ports) and a Redis
    # listener (over the 2 redis-servers), of those the chosen scenarios use.
    local nofile maxconn p i load_module='' v
    nofile=$(ulimit -n)
    maxconn=$(((nofile - 500) / 2)) # two descriptors per proxied connection, some to spare
    local -a pools=()
    ((needs_web)) && pools+=(web)
    ((needs_redis)) && pools+=(redis)
    pool_ports() { if [[ $1 == web ]]; then echo "${web_ports[*]}"; else echo "${redis_ports[*]}"; fi; }
    listen_port() { if [[ $1 == web ]]; then echo "${web_port[$2]}"; else echo "${redis_port[$2]}"; fi; }

    # The ringlb targets: the same but for the relay mode (and their ports).
    local t
    for t in "${ringlb_targets[@]}"; do
        {
            if [[ $t == ringlb ]]; then
                echo "# ringlb under test, default relay: least_conn, $proxy_threads worker(s)."
            elif [[ $t == ringlb-pack ]]; then
                echo "# ringlb under test, spread = pack: least_conn, $proxy_threads worker(s)."
                echo 'spread = "pack"'
            elif [[ $t == ringlb-nolog ]]; then
                echo "# ringlb under test, no connection log: least_conn, $proxy_threads worker(s)."
                echo 'connection_log = false'
            elif [[ $t == ringlb-alt ]]; then
                echo "# ringlb-alt: $RINGLB_ALT_BIN, least_conn, $proxy_threads worker(s), and --alt-config:"
                [[ -z $alt_config ]] || printf '%s\n' "$alt_config"
            else
                echo "# ringlb under test, relay = ${t#ringlb-}: least_conn, $proxy_threads worker(s)."
                echo "relay = \"${t#ringlb-}\""
            fi
            echo "workers = $proxy_threads"
            echo 'connect_timeout = "3s"'
            echo 'idle_timeout = "1h"'
            echo 'drain_timeout = "2s"'
            for pool in "${pools[@]}"; do
                printf '\n[listeners.%s]\nbind = "127.0.0.1:%s"\npool = "%s"\n' "$pool" "$(listen_port "$pool" "$t")" "$pool"
            done
            for pool in "${pools[@]}"; do
                printf '\n[pools.%s]\nalgorithm = "least_conn"\nbackends = [' "$pool"
                i=0
                for p in $(pool_ports "$pool"); do
                    ((i++)) && printf ', '
                    printf '{ address = "127.0.0.1:%s" }' "$p"
                done
                printf ']\n'
                if [[ $pool == redis ]]; then
                    printf '\n[pools.redis.health]\n%s\n%s\n' 'send = "PING\r\n"' 'expect = "+PONG"'
                fi
            done
        } >"$tmp/conf/$t.toml"
    done

    {
        cat <<EOC
# HAProxy under test: mode tcp, leastconn, $proxy_threads thread(s), light TCP health checks.
global
    nbthread $proxy_threads
    maxconn $maxconn

defaults
    mode tcp
    maxconn $maxconn
    timeout connect 3s
    timeout client 1h
    timeout server 1h
EOC
        for pool in "${pools[@]}"; do
            printf '\nfrontend %s\n    bind 127.0.0.1:%s\n    default_backend %s\n' "$pool" "$(listen_port "$pool" haproxy)" "$pool"
            printf '\nbackend %s\n    balance leastconn\n' "$pool"
            i=0
            for p in $(pool_ports "$pool"); do
                printf '    server %s%d 127.0.0.1:%s check inter 2s\n' "$pool" $((++i)) "$p"
            done
        done
    } >"$tmp/conf/haproxy.cfg"

    if wants nginx "${targets[*]}"; then
        v=$(nginx -V 2>&1 || true)
        [[ $v =~ --with-stream( |$) ]] || load_module="load_module $(nginx_modules_dir)/ngx_stream_module.so;"
    fi
    mkdir -p "$tmp/nginx-stream"
    {
        cat <<EOC
# nginx stream under test: least_conn, $proxy_threads worker(s), SO_REUSEPORT listeners.
$load_module
worker_processes $proxy_threads;
worker_rlimit_nofile $nofile;
daemon off;
pid $tmp/nginx-stream/nginx.pid;
error_log $tmp/logs/nginx-stream.error.log warn;
events { worker_connections $((nofile - 100)); }
stream {
    proxy_connect_timeout 3s;
    proxy_timeout 1h;
EOC
        for pool in "${pools[@]}"; do
            printf '    upstream %s {\n        least_conn;\n' "$pool"
            for p in $(pool_ports "$pool"); do printf '        server 127.0.0.1:%s;\n' "$p"; done
            printf '    }\n    server {\n        listen 127.0.0.1:%s reuseport;\n        proxy_pass %s;\n    }\n' \
                "$(listen_port "$pool" nginx)" "$pool"
        done
        echo '}'
    } >"$tmp/conf/nginx-stream.conf"
}

check_proxy_configs() {
    local t
    for t in "${ringlb_targets[@]}"; do
        wants "$t" "${targets[*]}" || continue
        if ! "$RINGLB_BIN" check -c "$tmp/conf/$t.toml" >"$tmp/logs/$t-check.log" 2>&1; then
            cat "$tmp/logs/$t-check.log" >&2
            if grep -q 'unknown field .relay.\|"auto" is not valid' "$tmp/logs/$t-check.log"; then
                die "$RINGLB_BIN predates the relay mode $t needs: rebuild it (cargo build --release --bins) or leave $t out of --targets"
            fi
            die "ringlb rejected the generated configuration for $t (above)"
        fi
    done
    if wants haproxy "${targets[*]}"; then
        haproxy -c -q -f "$tmp/conf/haproxy.cfg" >"$tmp/logs/haproxy-check.log" 2>&1 ||
            { cat "$tmp/logs/haproxy-check.log" >&2; die "haproxy rejected the generated configuration"; }
    fi
    if wants nginx "${targets[*]}"; then
        nginx -t -q -e "$tmp/logs/nginx-stream.error.log" -p "$tmp/nginx-stream/" -c "$tmp/conf/nginx-stream.conf" ||
            die "nginx rejected the generated stream configuration (above)"
    fi
}

start_target() { # start_target TARGET; sets target_pid ('' for direct)
    local t=$1
    target_pid=''
    case $t in
        direct) return 0 ;;
        ringlb | ringlb-copy | ringlb-splice | ringlb-pack | ringlb-nolog) start_bg "$t" "${on_proxy_cpus[@]}" "$RINGLB_BIN" run -c "$tmp/conf/$t.toml" ;;
        ringlb-alt) start_bg "$t" "${on_proxy_cpus[@]}" "$RINGLB_ALT_BIN" run -c "$tmp/conf/$t.toml" ;;
        haproxy) start_bg haproxy "${on_proxy_cpus[@]}" haproxy -db -f "$tmp/conf/haproxy.cfg" ;;
        nginx) start_bg nginx "${on_proxy_cpus[@]}" nginx -e "$tmp/logs/nginx-stream.error.log" -p "$tmp/nginx-stream/" -c "$tmp/conf/nginx-stream.conf" ;;
    esac
    target_pid=${pid_of[$t]}
    local ports=()
    ((needs_web)) && ports+=("${web_port[$t]}")
    ((needs_redis)) && ports+=("${redis_port[$t]}")
    wait_ports "$t" "${ports[@]}"
    sleep 0.5 # let every worker/thread finish starting before anything is measured
}

run_scenario() { # run_scenario ROUND TARGET SCENARIO
    local r=$1 t=$2 s=$3 port offered=0
    case $s in fixedrate) offered=$rate ;; fixedclose) offered=$close_rate ;; esac
    case $s in bulk | keepalive | connclose | fixedrate | fixedclose) port=${web_port[$t]} ;; *) port=${redis_port[$t]} ;; esac
    if [[ $s == idle && $t == direct ]]; then
        printf '    %-13s %-10s %s\n' "$t" idle "(no proxy: nothing to measure)" # as run.py prints
        return 0
    fi
    local target_pid=${target_pid_of[$t]}
    python3 "$bench_dir/run.py" "$s" --target "$t" --round "$r" --port "$port" --pids "$target_pid" \
        --out "$tmp/raw.jsonl" --duration "$duration" --warmup "$warmup" --threads "$load_cores" \
        --conns 50 --redis-requests "$redis_requests" --idle-conns "$idle_conns" --settle "$settle" \
        --cpus "$load_cpus" --proxy-cores "$proxy_threads" --rate "$offered" --tmp "$tmp" &
    runner_pid=$!
    wait "$runner_pid" || log "scenario runner for $t/$s exited with status $?"
    runner_pid=''
    if [[ $t != direct ]] && ! alive "$target_pid"; then
        tail -n 20 "$tmp/logs/$t.log" >&2
        die "$t died during the $s scenario (its log is above)"
    fi
    sleep "$pause"
}

version_of() { # the version alone, e.g. 2.6.12-1+deb12u4 (the whole first line if that fails)
    local line v=''
    case $1 in
        ringlb) line=$("$RINGLB_BIN" --version 2>&1 | head -n 1 || true) ;;
        haproxy) line=$(haproxy -v 2>&1 | head -n 1 || true); [[ $line =~ version\ ([^ ]+) ]] && v=${BASH_REMATCH[1]} ;;
        nginx) line=$(nginx -v 2>&1 | head -n 1 || true); [[ $line =~ nginx/([^ ]+) ]] && v=${BASH_REMATCH[1]} ;;
        wrk) line=$(wrk -v 2>&1 | head -n 1 || true); [[ $line =~ ^wrk\ ([^ ]+) ]] && v=${BASH_REMATCH[1]} ;;
        redis) line=$(redis-server --version 2>&1 | head -n 1 || true); [[ $line =~ v=([^ ]+) ]] && v=${BASH_REMATCH[1]} ;;
    esac
    echo "${v:-$line}"
}

# ---------------------------------------------------------------- main

mkdir -p "$tmp/logs"
install_tools
check_tools

# Open-file limit: 20000, or what the idle scenario needs if more (up to the hard limit). A
# proxied connection takes 2 descriptors; ringlb with relay = "splice" or "auto" (the default)
# also sets a quarter of its budget aside for pipes and sizes its connection limit (split
# evenly over its workers) by the rest.
fds_per_conn=2
pipe_share=0
if wants ringlb "${targets[*]}" || wants ringlb-splice "${targets[*]}" || wants ringlb-pack "${targets[*]}" ||
    wants ringlb-nolog "${targets[*]}" || wants ringlb-alt "${targets[*]}"; then
    pipe_share=1
fi
fds_for() { # fds_for N: the open-file limit N idle connections need (10% spare: uneven workers)
    local need=$((($1 + $1 / 10 + 64) * fds_per_conn + 200))
    ((pipe_share)) && need=$((need * 4 / 3))
    echo "$need"
}
nofile=20000
if wants idle "${scenarios[*]}" && (($(fds_for "$idle_conns") > nofile)); then nofile=$(fds_for "$idle_conns"); fi
hard=$(ulimit -Hn)
if [[ $hard != unlimited ]] && ((hard < nofile)); then nofile=$hard; fi
ulimit -n "$nofile" || die "cannot set the open-file limit to $nofile (hard limit: $hard)"
if wants idle "${scenarios[*]}" && (($(fds_for "$idle_conns") > nofile)); then
    usable=$(( pipe_share ? (nofile - 200) * 3 / 4 : nofile - 200 ))
    new=$(((usable / fds_per_conn - 64) * 10 / 11))
    ((new > 100)) && new=$((new / 100 * 100))
    ((new > 0)) || die "the open-file limit ($nofile) is too low for the idle scenario; raise it or leave idle out of --scenarios"
    why=''
    ((pipe_share)) && why=' (splicing ringlb sets a quarter of its descriptors aside for pipes)'
    log "the open-file limit ($nofile, the hard limit) allows about $new idle connections through every proxy$why, not $idle_conns; using $new for every target"
    idle_conns=$new
fi
settle=1
((quick)) && settle=0.5
# redis-benchmark counts requests, not seconds: aim at about --duration seconds per test.
redis_requests=$((duration * 25000))

for t in "${targets[@]}"; do
    for p in ${web_port[$t]} ${redis_port[$t]}; do
        port_open "$p" && die "127.0.0.1:$p is already in use; stop what listens there or set BENCH_PORT_BASE"
    done
done
for p in "${web_ports[@]}" "${redis_ports[@]}"; do
    port_open "$p" && die "127.0.0.1:$p is already in use; stop what listens there or set BENCH_PORT_BASE"
done

mkdir -p "$out" || die "cannot create $out"
rm -f "$out/results.md" "$out/results.json" "$out/results.svg" # no stale results if this run fails
{
    printf 'command\t%s\n' "$cmdline"
    printf 'ringlb_bin\t%s\n' "$RINGLB_BIN"
    if wants ringlb-alt "${targets[*]}"; then
        printf 'ringlb_alt_bin\t%s\n' "$RINGLB_ALT_BIN"
        printf 'alt_config\t%s\n' "${alt_config//$'\n'/; }"
    fi
    printf 'rounds\t%s\nduration_s\t%s\nwarmup_s\t%s\npause_s\t%s\nidle_conns\t%s\nredis_requests\t%s\n' \
        "$rounds" "$duration" "$warmup" "$pause" "$idle_conns" "$redis_requests"
    printf 'targets\t%s\nscenarios\t%s\ncpus\t%s\nproxy_threads\t%s\nnofile\t%s\n' \
        "${targets[*]}" "${scenarios[*]}" "$ncpu" "$proxy_threads" "$(ulimit -n)"
    printf 'layout\t%s\nproxy_cpus\t%s\nload_cpus\t%s\n' "$layout" "${proxy_cpus:-all}" "${load_cpus:-all}"
    printf 'git\t%s\n' "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)"
    for tool in ringlb haproxy nginx wrk redis; do
        case $tool in
            ringlb) wants_ringlb || continue ;;
            haproxy) wants haproxy "${targets[*]}" || continue ;;
            nginx) command -v nginx >/dev/null || continue ;;
            wrk) command -v wrk >/dev/null || continue ;;
            redis) command -v redis-server >/dev/null || continue ;;
        esac
        printf 'version_%s\t%s\n' "$tool" "$(version_of "$tool")"
    done
} >"$tmp/meta.tsv"

log "ringlb bench: ${targets[*]} x ${scenarios[*]}; $rounds round(s) of ${duration} s per scenario; results in $out"
sed -n 's/^version_\([^\t]*\)\t/    \1: /p' "$tmp/meta.tsv"

write_backend_configs
write_proxy_configs
check_proxy_configs
start_backends
log "backends up:$( ((needs_web)) && echo " nginx on ${web_ports[*]};")$( ((needs_redis)) && echo " redis on ${redis_ports[*]}")"

# Every proxy runs for the whole bench, each on its own ports, and every round runs each
# scenario through every target back to back, the targets in a rotated order from round to
# round: a minute of noise from elsewhere on the machine then falls on one round of every
# target instead of on every scenario of one target, and the report's ratios compare targets
# within a round.
for t in "${targets[@]}"; do
    start_target "$t"
    target_pid_of[$t]=$target_pid
    [[ $t == direct ]] || log "$t up (pid $target_pid)"
done
rotated() { # rotated ROUND: the targets, starting with the (ROUND-1)th one
    local n=${#targets[@]} i
    for ((i = 0; i < n; i++)); do echo "${targets[(i + $1 - 1) % n]}"; done
}
start_s=$SECONDS
main_scenarios=()
for s in "${scenarios[@]}"; do [[ $s == fixed* ]] || main_scenarios+=("$s"); done
if ((${#main_scenarios[@]})); then
    for ((r = 1; r <= rounds; r++)); do
        log "round $r of $rounds"
        mapfile -t order < <(rotated "$r")
        for s in "${main_scenarios[@]}"; do
            for t in "${order[@]}"; do
                run_scenario "$r" "$t" "$s"
            done
        done
    done
fi
slowest_share() { # slowest_share SCENARIO KEY: 60% of the slowest proxy's median KEY in SCENARIO
    python3 - "$tmp/raw.jsonl" "$1" "$2" <<'EOP'
import json, statistics, sys
path, scenario, key = sys.argv[1:]
runs = [json.loads(l) for l in open(path) if l.strip()]
by = {}
for r in runs:
    if r["ok"] and r["scenario"] == scenario and r["target"] != "direct":
        by.setdefault(r["target"], []).append(r["metrics"][key])
print(int(0.6 * min(statistics.median(v) for v in by.values())) if by else "")
EOP
}
# The fixed-rate scenarios, each at 60% of the slowest proxy's rate in its open-loop twin.
for s in fixedrate fixedclose; do
    wants "$s" "${scenarios[*]}" || continue
    if [[ $s == fixedrate ]]; then
        var=rate base=keepalive key=rps option=--rate meta_key=fixed_rate
    else
        var=close_rate base=connclose key=cps option=--close-rate meta_key=fixed_close_rate
    fi
    if [[ -z ${!var} ]]; then
        printf -v "$var" '%s' "$(slowest_share "$base" "$key" || true)"
        [[ -n ${!var} ]] || die "$s needs the $base results of a proxy in this run (add $base to --scenarios) or $option"
        log "$s: ${!var} per second offered (60% of the slowest proxy's $base rate)"
    fi
    printf '%s\t%s\n' "$meta_key" "${!var}" >>"$tmp/meta.tsv"
    for ((r = 1; r <= rounds; r++)); do
        log "$s round $r of $rounds"
        mapfile -t order < <(rotated "$r")
        for t in "${order[@]}"; do
            run_scenario "$r" "$t" "$s"
        done
    done
done
log "load finished in $((SECONDS - start_s)) s; writing results"

rm -rf "$out/configs"
mkdir -p "$out/configs"
cp "$tmp/conf/"* "$out/configs/"
sed -i "s#$tmp#\$TMPDIR#g" "$out/configs/"* # the temp dir is gone after the run
report_rc=0
python3 "$bench_dir/report.py" --raw "$tmp/raw.jsonl" --meta "$tmp/meta.tsv" --out "$out" || report_rc=$?
((report_rc == 0 || report_rc == 3)) || die "could not write the report (report.py exited $report_rc)"
log "wrote $out/results.md, results.json, results.svg (the configs used are in $out/configs/, the servers' logs in $out/logs/)"
((report_rc == 0)) || die "some runs failed; see 'Failures and warnings' in $out/results.md"
