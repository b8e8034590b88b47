# Sourced by the check scripts (proxy-interop.sh, status-page.sh).
#
# free_ports N: prints N distinct free loopback ports. They are held together while chosen (so
# none repeats) and released before python exits. Read them with command substitution,
# ports=$(free_ports N), not `< <(free_ports N)`: only then does bash wait for python to exit,
# so that no port is still held when a server binds it.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
ports = [s.getsockname()[1] for s in socks]
for s in socks:
    s.close()
print(" ".join(map(str, ports)))
PY
}
