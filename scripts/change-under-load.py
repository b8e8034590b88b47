#!/usr/bin/env python3
"""Reloads (SIGHUP) or upgrades (SIGUSR2) ringlb again and again under load, and counts what
the clients saw go wrong: a refused or reset connect, a connection cut, a byte lost or changed.

    scripts/change-under-load.py [--change reload|upgrade] [--count N] [--binary PATH]

Starts two echo backends (ringlb-demo-backend) and ringlb (the release build by default) on
free loopback ports, then runs, until the changes are done:
  - keep-alive clients, each on one connection, sending messages of 1 B to 20 kB and checking
    every byte that comes back;
  - clients opening one connection per request (connect, one message, check, close).
A reload alternates between a config with both backends and one with the first only (the
open connections of the second keep relaying). An upgrade starts the same binary again; the
old process drains while the clients' keep-alive connections stay on it, so each client
reconnects once after an upgrade, as a pooled database client would when its connection is
closed (a clean close between requests is not counted as an error; a close in the middle of
a request is).

Prints one line per change (how long from the signal until ringlb logged the outcome) and a
summary; exits 1 if any client saw an error. Needs only Python 3 and a built ringlb
(cargo build --release --bins).
"""

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(n):
    """n distinct free loopback ports (held together while chosen, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port, proc, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def config(listen, metrics, backends):
    listed = ", ".join(f'{{ address = "127.0.0.1:{p}" }}' for p in backends)
    return (
        f'metrics_bind = "127.0.0.1:{metrics}"\ndrain_timeout = "30s"\n'
        f'[listeners.load]\nbind = "127.0.0.1:{listen}"\npool = "echo"\n'
        f"[pools.echo]\nbackends = [{listed}]\n"
        '[pools.echo.health]\ninterval = "1s"\n'
    )


class Log:
    """ringlb's stderr (the new processes an upgrade starts write to it too), kept in memory."""

    def __init__(self, stream):
        self.lines = []
        self.lock = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            with self.lock:
                self.lines.append(line)
                self.lock.notify_all()

    def wait_for(self, start, needles, timeout):
        """The first line from index `start` on that holds one of `needles`, and its index."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for i in range(start, len(self.lines)):
                    if any(n in self.lines[i] for n in needles):
                        return i, self.lines[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, None
                self.lock.wait(left)

    def count(self):
        with self.lock:
            return len(self.lines)


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.exchanges = 0
        self.connections = 0
        self.reconnects = 0
        self.errors = []

    def add(self, field, n=1):
        with self.lock:
            setattr(self, field, getattr(self, field) + n)

    def error(self, what):
        with self.lock:
            self.errors.append(what)


def recv_exact(sock, n):
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def keepalive_client(i, port, stop, tally):
    rng = random.Random(i)
    sock = None
    n = 0
    while not stop.is_set():
        if sock is None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            except OSError as e:
                tally.error(f"keep-alive client {i}: connect: {e}")
                return
        n += 1
        message = rng.randbytes(rng.randint(1, 20000))
        try:
            sock.sendall(message)
            back = recv_exact(sock, len(message))
        except (OSError, ConnectionError) as e:
            tally.error(f"keep-alive client {i}, exchange {n}: {e}")
            return
        if back != message:
            tally.error(f"keep-alive client {i}, exchange {n}: the bytes that came back differ")
            return
        tally.add("exchanges")
        # A connection the old process closes after an upgrade's drain ends between requests:
        # see whether it was closed (no request is in flight now), and if so reconnect.
        sock.setblocking(False)
        try:
            closed = sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        sock.setblocking(True)
        if closed:
            sock.close()
            sock = None
            tally.add("reconnects")
    if sock is not None:
        sock.close()


def per_request_client(i, port, stop, tally):
    n = 0
    while not stop.is_set():
        n += 1
        message = f"request {i}/{n}\n".encode()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(message)
                back = recv_exact(sock, len(message))
        except (OSError, ConnectionError) as e:
            tally.error(f"per-request client {i}, connection {n}: {e}")
            continue
        if back != message:
            tally.error(f"per-request client {i}, connection {n}: the bytes that came back differ")
            continue
        tally.add("connections")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--change", choices=["reload", "upgrade"], default="upgrade")
    parser.add_argument("--count", type=int, default=10, help="how many changes (default 10)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between changes (default 1)")
    parser.add_argument("--keepalive", type=int, default=6, help="keep-alive clients (default 6)")
    parser.add_argument("--per-request", type=int, default=4, help="per-request clients (default 4)")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/ringlb"))
    args = parser.parse_args()
    backend_bin = os.path.join(os.path.dirname(args.binary), "ringlb-demo-backend")
    for path in (args.binary, backend_bin):
        if not os.access(path, os.X_OK):
            sys.exit(f"{path} is missing: build it with cargo build --release --bins")

    first, second, listen, metrics = free_ports(4)
    backends = [first, second]
    work = tempfile.mkdtemp(prefix="ringlb-change-")
    path = os.path.join(work, "ringlb.toml")
    both, first = config(listen, metrics, backends), config(listen, metrics, backends[:1])
    with open(path, "w") as f:
        f.write(both)

    procs = []
    backend = subprocess.Popen([backend_bin] + [f"127.0.0.1:{p}" for p in backends], stderr=subprocess.DEVNULL)
    procs.append(backend)
    for p in backends:
        wait_port(p, backend, "ringlb-demo-backend")
    lb = subprocess.Popen([args.binary, "run", "-c", path], stderr=subprocess.PIPE, env=dict(os.environ, RUST_LOG="info"))
    log = Log(lb.stderr)
    wait_port(listen, lb, "ringlb")
    pids = [lb.pid]

    stop = threading.Event()
    tally = Tally()
    threads = [threading.Thread(target=keepalive_client, args=(i, listen, stop, tally)) for i in range(args.keepalive)]
    threads += [threading.Thread(target=per_request_client, args=(i, listen, stop, tally)) for i in range(args.per_request)]
    for t in threads:
        t.start()
    started = time.monotonic()
    took = []
    failed_changes = 0
    try:
        time.sleep(args.interval)
        for n in range(1, args.count + 1):
            mark = log.count()
            t0 = time.monotonic()
            if args.change == "reload":
                with open(path, "w") as f:
                    f.write(first if n % 2 else both)
                os.kill(pids[-1], signal.SIGHUP)
                i, line = log.wait_for(mark, ["] reload: ", "] reload failed"], 60)
            else:
                os.kill(pids[-1], signal.SIGUSR2)
                i, line = log.wait_for(mark, ["] SIGUSR2: "], 60)
            elapsed = time.monotonic() - t0
            ok = line is not None and ("] reload: " in line or " serves now" in line)
            if not ok:
                failed_changes += 1
            if ok and args.change == "upgrade":
                pids.append(int(line.split("SIGUSR2: pid ")[1].split()[0]))
            took.append(elapsed)
            print(f"{args.change} {n}: {'ok' if ok else 'FAILED'} in {elapsed * 1000:.0f} ms"
                  f"{'' if ok else ': ' + str(line)}", flush=True)
            time.sleep(args.interval)
    finally:
        stop.set()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.kill()
        lb.wait()

    took.sort()
    print(f"\n{args.count} {args.change}s in {seconds:.1f} s, every {args.interval} s, under "
          f"{args.keepalive} keep-alive and {args.per_request} per-request clients:")
    print(f"  exchanges on keep-alive connections: {tally.exchanges} (reconnects after a drain closed "
          f"one between requests: {tally.reconnects})")
    print(f"  per-request connections: {tally.connections}")
    if took:
        print(f"  signal to outcome logged: median {took[len(took) // 2] * 1000:.0f} ms, "
              f"max {took[-1] * 1000:.0f} ms")
    print(f"  changes that failed: {failed_changes}")
    print(f"  client errors: {len(tally.errors)}")
    for e in tally.errors[:20]:
        print(f"    {e}")
    return 1 if tally.errors or failed_changes else 0


if __name__ == "__main__":
    sys.exit(main())
