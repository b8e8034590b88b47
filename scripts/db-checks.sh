#!/usr/bin/env bash
# Health checks that speak the database's protocol, against real servers:
#   - MariaDB and PostgreSQL run in a network namespace (10.200.0.2), ringlb outside it
#     (10.200.0.1), so the servers see the checks come from a non-loopback address (loopback is
#     exempt from MariaDB's max_connect_errors);
#   - `protocol = "mysql"` and `"postgres"` checks pass against them (PostgreSQL with trust and
#     with a password: any authentication request passes), and fail with the server's error for
#     a database that does not exist;
#   - 1,000 `mysql` checks leave ringlb's address unblocked (max_connect_errors = 10 here),
#     where plain TCP checks (connect, close) get it blocked: every client behind the balancer
#     is then refused with error 1129 while the TCP check still says the server is up, and the
#     `mysql` check says it is down, with the server's message.
# Installs mariadb-server, mariadb-client and postgresql (apt-get, as root) when missing; runs
# its own instances in its own namespace and removes everything on exit.
# Usage: scripts/db-checks.sh [RINGLB_BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/install.sh
ringlb=$(realpath "${1:-${RINGLB_BIN:-target/release/ringlb}}")
[ -x "$ringlb" ] || { echo "no ringlb binary at $ringlb (build with: cargo build --release)" >&2; exit 1; }

missing=()
command -v mariadbd >/dev/null || missing+=(mariadb-server)
command -v mariadb >/dev/null || missing+=(mariadb-client)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
install_missing "mariadb postgresql" "${missing[@]}"
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

ns=ringlb-db$$
host_if=rldb$$h
host_ip=10.200.0.1
db_ip=10.200.0.2
work=$(mktemp -d /tmp/ringlb-db.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip link del "$host_if" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns" "$work"
}
trap cleanup EXIT
fail() { echo "FAIL $*" >&2; echo "--- ringlb log" >&2; tail -40 "$work/ringlb.log" >&2 || true; exit 1; }
# Runs "$@" until it succeeds, up to $1 seconds.
until_ok() {
    local seconds=$1; shift
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

# The namespace, a veth pair between it and this host, and a hosts file inside it so that the
# servers' reverse lookups of ringlb's address answer at once (ip netns exec mounts it).
ip netns add "$ns"
ip link add "$host_if" type veth peer name eth0 netns "$ns"
ip addr add "$host_ip/24" dev "$host_if"
ip link set "$host_if" up
ip netns exec "$ns" ip addr add "$db_ip/24" dev eth0
ip netns exec "$ns" ip link set eth0 up
ip netns exec "$ns" ip link set lo up
mkdir -p "/etc/netns/$ns"
printf '127.0.0.1 localhost\n%s ringlb-host\n%s db-host\n' "$host_ip" "$db_ip" >"/etc/netns/$ns/hosts"
in_ns() { ip netns exec "$ns" "$@"; }

echo "== MariaDB $(mariadbd --version | awk '{print $3}') and PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') in namespace $ns ($db_ip)"
mariadb-install-db --no-defaults --datadir="$work/mysql" --user=root --skip-test-db >"$work/mysql-install.log" 2>&1 \
    || { cat "$work/mysql-install.log"; exit 1; }
# Started with ip itself, not through in_ns: a shell function in the background is a subshell,
# and $! would be that subshell's pid, which cleanup would kill, leaving the server running.
ip netns exec "$ns" mariadbd --no-defaults --datadir="$work/mysql" --user=root --bind-address="$db_ip" --port=3306 \
    --socket="$work/mysql.sock" --pid-file="$work/mysql.pid" --log-error="$work/mysql.err" \
    --max-connect-errors=10 --skip-log-bin &
pids+=($!)
sql() { mariadb --no-defaults --socket="$work/mysql.sock" -u root -N -B -e "$1"; }
until_ok 60 sql "SELECT 1" || { cat "$work/mysql.err"; fail "MariaDB did not start"; }
sql "CREATE USER 'ringlb'@'%'; CREATE USER 'app'@'%' IDENTIFIED BY 'app';"

mkdir -p "$work/pg" "$work/pgsock"
chown postgres "$work/pg" "$work/pgsock"
runuser -u postgres -- "$pgbin/initdb" -D "$work/pg" -A trust -U postgres >"$work/pg-init.log" 2>&1 \
    || { cat "$work/pg-init.log"; exit 1; }
cat >"$work/pg/pg_hba.conf" <<EOF
local all all trust
host all ringlb $host_ip/32 trust
host all all $host_ip/32 scram-sha-256
EOF
ip netns exec "$ns" runuser -u postgres -- "$pgbin/postgres" -D "$work/pg" -c listen_addresses="$db_ip" -c port=5432 \
    -c unix_socket_directories="$work/pgsock" >"$work/pg.log" 2>&1 &
pids+=($!)
until_ok 60 "$pgbin/pg_isready" -q -h "$db_ip" -p 5432 || { cat "$work/pg.log"; fail "PostgreSQL did not start"; }
runuser -u postgres -- "$pgbin/psql" -q -h "$work/pgsock" -c "CREATE ROLE ringlb LOGIN; CREATE ROLE app LOGIN PASSWORD 'app';"

# Connections the server counted (every check is one), and whether this host may still log in.
connections() { sql "SHOW GLOBAL STATUS LIKE 'Connections'" | awk '{print $2}'; }
client_login() { mariadb --no-defaults -h "$db_ip" -u app -papp -N -B -e "SELECT 1" 2>&1; }

# A pool NAME with the database at PORT as its one backend, checked with the lines given
# (interval 100 ms unless one of them sets it; rise and fall 1).
pool() {
    local name=$1 port=$2
    shift 2
    printf '\n[pools.%s]\nbackends = [{ address = "%s:%s" }]\n[pools.%s.health]\n' "$name" "$db_ip" "$port" "$name"
    printf '%s\n' "$@"
    [[ " $* " == *"interval = "* ]] || echo 'interval = "100ms"'
    printf 'rise = 1\nfall = 1\n'
}

# The config; $1 is how the pool "mysql" is checked: "mysql" (a login) or "tcp" (connect, close).
write_config() {
    local check='protocol = "mysql"
user = "ringlb"'
    [ "$1" = tcp ] && check='protocol = "tcp"'
    cat >"$work/ringlb.toml" <<EOF
workers = 1
admin_socket = "$work/admin.sock"
connection_log = false

[listeners.mysql]
bind = "127.0.0.1:0"
pool = "mysql"

[listeners.pg]
bind = "127.0.0.1:0"
pool = "pg_trust"

$(pool mysql 3306 "$check" 'interval = "10ms"' 'timeout = "2s"')
$(pool pg_trust 5432 'protocol = "postgres"' 'user = "ringlb"')
$(pool pg_password 5432 'protocol = "postgres"' 'user = "app"')
$(pool pg_no_database 5432 'protocol = "postgres"' 'user = "ringlb"' 'database = "nope"')
$(pool mysql_login 3306 'protocol = "mysql"' 'user = "ringlb"')
EOF
}
start_ringlb() {
    "$ringlb" run -c "$work/ringlb.toml" >>"$work/ringlb.log" 2>&1 &
    ringlb_pid=$!
    pids+=("$ringlb_pid")
    until_ok 30 test -S "$work/admin.sock" || fail "ringlb did not start"
}
# The health of pool $1's only backend, and its last check's detail.
health() {
    "$ringlb" ctl --socket "$work/admin.sock" --json pools "$1" | python3 -c '
import json, sys
b = json.load(sys.stdin)["backends"][0]
last = b.get("last_check") or {}
print(b["health"], last.get("passed"), last.get("detail") or "")'
}
is_health() { health "$1" | grep -q "^$2 "; }
passed() { health "$1" | grep -q "^up True"; }

echo "== protocol checks: mysql, postgres (trust, password), a database that does not exist"
write_config mysql
start_ringlb
until_ok 30 is_health pg_no_database down || fail "pg_no_database: $(health pg_no_database)"
health pg_no_database | grep -q "3D000" || fail "pg_no_database: $(health pg_no_database)"
echo "ok   postgres check, database \"nope\": down ($(health pg_no_database | cut -d' ' -f3-))"
for pool in mysql pg_trust pg_password; do
    until_ok 30 passed "$pool" || fail "$pool: no check passed: $(health $pool)"
    is_health "$pool" up || fail "$pool: $(health $pool)"
    echo "ok   $pool check passes"
done

echo "== 1,000 mysql checks from $host_ip (max_connect_errors = 10)"
start=$(connections)
thousand_checks() { [ $(($(connections) - start)) -ge 1000 ]; }
until_ok 300 thousand_checks || fail "only $(($(connections) - start)) checks came"
echo "ok   the server counted $(($(connections) - start)) connections from ringlb's checks"
out=$(client_login) || fail "a client login was refused after the mysql checks: $out"
is_health mysql up || fail "mysql: $(health mysql)"
echo "ok   $host_ip is not blocked: a client logs in, and the check still passes"
aborted=$(sql "SHOW GLOBAL STATUS LIKE 'Aborted_connects'" | awk '{print $2}')
[ "$aborted" = 0 ] || fail "the server counted $aborted aborted connects"
echo "ok   Aborted_connects = 0"
kill "$ringlb_pid"
wait "$ringlb_pid" 2>/dev/null || true

echo "== the same with plain TCP checks (connect, close) in pool mysql; pool mysql_login logs in"
write_config tcp
rm -f "$work/admin.sock"
start_ringlb
blocked_out=''
blocked() {
    blocked_out=$(client_login) && return 1
    [[ $blocked_out == *"is blocked"* ]]
}
until_ok 120 blocked || fail "TCP checks did not get $host_ip blocked: $(client_login)"
echo "ok   after TCP checks a client from $host_ip is refused: $(grep -o "1129.*" <<<"$blocked_out" | head -1)"
until_ok 30 is_health mysql_login down || fail "mysql_login: $(health mysql_login)"
health mysql_login | grep -q "1129" || fail "mysql_login: $(health mysql_login)"
is_health mysql up || fail "mysql (tcp): $(health mysql)"
echo "ok   the TCP check still says up; the mysql check says down: $(health mysql_login | cut -d' ' -f3-)"
echo "all database check tests passed"
