#!/usr/bin/env python3
"""Runs one scenario against one target and appends one JSON record to a file.

Called by scripts/bench.sh, once per round, target and scenario. The proxy's CPU time
(procstat.py) is sampled right before and right after the load, so it covers the scenario
window only. Every load run has a deadline; a run that fails is recorded with its error
(and the bench goes on) rather than stopping the whole bench.

    run.py SCENARIO --target T --round N --port P [--pids "PID ..."] --out raw.jsonl ...

Scenarios: bulk, keepalive, connclose (wrk); redis (redis-benchmark); idle (sockets held
here, with a PING round trip on each so it is connected through to a Redis backend);
fixedrate (wrk, 100-byte keep-alive requests sent on a schedule of --rate requests/s in all:
every proxy gets the same offered load, and the figures are CPU per request and latency);
fixedclose (the same with one connection per request: CPU per connection and latency).

With --cpus, the load generator runs on those CPUs only (taskset), away from the proxy's; with
--proxy-cores, the proxy's busy share (its CPU time over the wall time of the cores it has) is
recorded too.
"""

import argparse
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ left in scripts/bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procstat  # noqa: E402

WRK_LUA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk_report.lua")

_child = None


def _on_term(signum, _frame):
    # The bench's cleanup sends SIGTERM; take the load generator down with us.
    if _child is not None and _child.poll() is None:
        _child.kill()
        try:
            _child.wait(timeout=5)  # reaped here, so no zombie is left behind
        except subprocess.TimeoutExpired:
            pass
    sys.exit(128 + signum)


class LoadError(Exception):
    pass


def pinned(args, cmd):
    """cmd on the load generator's CPUs (--cpus), if given."""
    return (["taskset", "-c", args.cpus] if args.cpus else []) + cmd


def run_tool(cmd, deadline):
    """Run a load generator; return its stdout. Kill it at the deadline (seconds)."""
    global _child
    _child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        out, err = _child.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        _child.kill()
        _child.communicate()
        raise LoadError(f"{os.path.basename(cmd[0])} did not finish within {deadline:.0f} s (killed)")
    finally:
        rc = _child.returncode
        _child = None
    if rc != 0:
        tail = (err or out).strip().splitlines()[-3:]
        raise LoadError(f"{os.path.basename(cmd[0])} exited {rc}: {' | '.join(tail)}")
    return out


def measured(pids, fn):
    """Run fn() between two CPU samples of the proxy; return (result, cpu_s, wall_s)."""
    cpu0 = procstat.cpu_seconds(pids) if pids else None
    t0 = time.monotonic()
    result = fn()
    wall = time.monotonic() - t0
    cpu = procstat.cpu_seconds(pids) - cpu0 if pids else None
    return result, cpu, wall


def wrk(args, path, conns, timeout_s, extra_headers=(), script=WRK_LUA):
    """Run wrk once for args.duration seconds; return its JSON summary."""
    url = f"http://127.0.0.1:{args.port}{path}"
    threads = min(args.threads, conns)
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{args.duration}s",
           "--timeout", f"{timeout_s}s", "--latency", "-s", script]
    for h in extra_headers:
        cmd += ["-H", h]
    cmd.append(url)
    out = run_tool(pinned(args, cmd), deadline=args.duration + timeout_s + 30)
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            summary = json.loads(line[len("WRKJSON "):])
            break
    else:
        raise LoadError("wrk printed no summary (is the Lua script readable?)")
    summary["errors_total"] = sum(summary["errors"].values())
    if summary["requests"] == 0 and summary["bytes"] == 0:
        raise LoadError(f"wrk completed no request (errors: {summary['errors']})")
    return summary


def warmup(args, path, conns, extra_headers=(), script=WRK_LUA):
    if args.warmup > 0:
        saved = args.duration
        args.duration = args.warmup
        try:
            wrk(args, path, conns, 10, extra_headers, script)
        finally:
            args.duration = saved


def scenario_bulk(args):
    warmup(args, "/big.bin", 4)
    s, cpu, wall = measured(args.pids, lambda: wrk(args, "/big.bin", 4, 30))
    secs = s["duration_us"] / 1e6
    gb = s["bytes"] / 1e9  # everything wrk read; the headers are ~200 bytes per 100 MiB
    m = {"gbps": gb / secs, "downloads": s["requests"]}
    if cpu is not None:
        m["cpu_s_per_gb"] = cpu / gb
    return m, cpu, wall, s


def _small_metrics(s, cpu, count_key, cpu_key):
    """Rate, p50, p99 and CPU per request of a wrk run of small requests."""
    secs = s["duration_us"] / 1e6
    lat = s["latency_us"]
    m = {count_key: s["requests"] / secs, "p50_ms": lat["p50"] / 1e3, "p99_ms": lat["p99"] / 1e3}
    if cpu is not None and s["requests"]:
        m[cpu_key] = cpu * 1e6 / s["requests"]
    return m


def _wrk_small(args, headers, count_key, cpu_key):
    warmup(args, "/small.bin", args.conns, headers)
    s, cpu, wall = measured(args.pids, lambda: wrk(args, "/small.bin", args.conns, 5, headers))
    return _small_metrics(s, cpu, count_key, cpu_key), cpu, wall, s


def scenario_keepalive(args):
    return _wrk_small(args, (), "rps", "cpu_us_per_req")


def scenario_connclose(args):
    # Connection: close makes nginx close after each response, so every request is a new
    # TCP connection from wrk through the proxy to a backend.
    return _wrk_small(args, ("Connection: close",), "cps", "cpu_us_per_conn")


def scenario_redis(args):
    n = args.redis_requests
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(args.port), "-c", str(args.conns),
           "-n", str(n), "-t", "set,get", "--csv"]
    deadline = max(60, args.duration * 20)
    out, cpu, wall = measured(args.pids, lambda: run_tool(pinned(args, cmd), deadline))
    tests = {}
    for row in csv.DictReader(io.StringIO(out)):
        tests[row["test"]] = {k: float(v) for k, v in row.items() if k != "test"}
    if set(tests) != {"SET", "GET"}:
        raise LoadError(f"redis-benchmark printed no SET and GET results: {out.strip()[:200]!r}")
    # The two tests run one after the other: combined rate = all requests / time of both.
    busy = sum(n / t["rps"] for t in tests.values())
    m = {"rps": 2 * n / busy,
         "p50_ms": max(t["p50_latency_ms"] for t in tests.values()),
         "p99_ms": max(t["p99_latency_ms"] for t in tests.values())}
    if cpu is not None:
        m["cpu_us_per_req"] = cpu * 1e6 / (2 * n)
    return m, cpu, wall, {"requests": 2 * n, "tests": tests}


# The fixed-rate scenario: wrk sends on a schedule of --rate requests a second in all
# (wrk_paced.lua), over as many connections as make one request per PACE_MS on each, so that
# a connection is free for the next slot unless answers take longer than that.
PACE_MS = 5
WRK_PACED_LUA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk_paced.lua")


def _wrk_paced(args, headers, count_key, cpu_key):
    if not args.rate:
        raise LoadError(f"{args.scenario} needs --rate")
    conns = max(1, round(args.rate * PACE_MS / 1000))
    threads = min(args.threads, conns)
    parts = []
    for path in (WRK_LUA, WRK_PACED_LUA):
        with open(path) as f:
            parts.append(f.read())
    script = os.path.join(args.tmp, f"wrk_paced_{os.getpid()}.lua")
    with open(script, "w") as f:
        f.write(parts[0] + f"\npaced_interval_ms = {threads * 1000 / args.rate!r}\n" + parts[1])
    try:
        warmup(args, "/small.bin", conns, headers, script)
        s, cpu, wall = measured(args.pids, lambda: wrk(args, "/small.bin", conns, 5, headers, script))
    finally:
        os.unlink(script)
    s["conns"] = conns
    return _small_metrics(s, cpu, count_key, cpu_key), cpu, wall, s


def scenario_fixedrate(args):
    return _wrk_paced(args, (), "rps", "cpu_us_per_req")


def scenario_fixedclose(args):
    # As fixedrate, but each request on a new connection (wrk reconnects after each
    # Connection: close answer and the new connection waits for its slot like any other).
    return _wrk_paced(args, ("Connection: close",), "cps", "cpu_us_per_conn")


def _ping(sock):
    sock.sendall(b"PING\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise LoadError(f"connection closed after {len(reply)} bytes, before +PONG")
        reply += chunk
    if reply != b"+PONG\r\n":
        raise LoadError(f"unexpected reply to PING: {reply[:40]!r}")


def scenario_idle(args):
    if not args.pids:
        raise LoadError("idle measures the proxy's memory; there is no proxy for this target")
    addr = ("127.0.0.1", args.port)
    # A few connections first, so one-time set-up on the first connections is not counted.
    for _ in range(50):
        with socket.create_connection(addr, timeout=5) as s:
            _ping(s)
    time.sleep(args.settle)
    before = procstat.rss_kib(args.pids)
    socks = []
    deadline = time.monotonic() + max(60, args.idle_conns / 50)
    try:
        for i in range(args.idle_conns):
            if time.monotonic() > deadline:
                raise LoadError(f"only {i} of {args.idle_conns} connections open at the deadline")
            try:
                s = socket.create_connection(addr, timeout=5)
                socks.append(s)
                _ping(s)
            except OSError as e:
                raise LoadError(f"connection {i + 1} of {args.idle_conns}: {e}") from None
        time.sleep(args.settle)
        after = procstat.rss_kib(args.pids)
        # Still all connected through (no proxy timeout or limit cut any of them)?
        for s in socks:
            _ping(s)
    finally:
        for s in socks:
            s.close()
    n = args.idle_conns
    m = {"rss_kib_per_conn": (after - before) / n, "rss_before_mib": before / 1024,
         "rss_after_mib": after / 1024}
    return m, None, None, {"conns": n, "rss_before_kib": before, "rss_after_kib": after}


SCENARIOS = {
    "bulk": scenario_bulk,
    "keepalive": scenario_keepalive,
    "connclose": scenario_connclose,
    "redis": scenario_redis,
    "idle": scenario_idle,
    "fixedrate": scenario_fixedrate,
    "fixedclose": scenario_fixedclose,
}


def _fmt(m):
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items())


def main():
    signal.signal(signal.SIGTERM, _on_term)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--target", required=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pids", default="", help="the proxy's root PIDs, blank for none")
    p.add_argument("--out", required=True, help="JSON lines file to append the record to")
    p.add_argument("--duration", type=int, default=10, help="seconds of load (wrk scenarios)")
    p.add_argument("--warmup", type=int, default=0, help="seconds of unmeasured load first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="wrk threads")
    p.add_argument("--conns", type=int, default=50, help="connections (keepalive, connclose, redis)")
    p.add_argument("--redis-requests", type=int, default=200000, help="redis-benchmark -n, per test")
    p.add_argument("--idle-conns", type=int, default=5000)
    p.add_argument("--settle", type=float, default=1.0, help="seconds to wait before an RSS sample")
    p.add_argument("--cpus", default="", help="taskset CPU list for the load generator (blank: any)")
    p.add_argument("--proxy-cores", type=int, default=0, help="cores the proxy has, for its busy share")
    p.add_argument("--rate", type=float, default=0, help="fixedrate, fixedclose: requests/s offered in all")
    p.add_argument("--tmp", default="/tmp", help="where the fixed-rate wrk script is written")
    args = p.parse_args()
    args.pids = [int(x) for x in args.pids.split()]

    record = {"round": args.round, "target": args.target, "scenario": args.scenario,
              "ok": False, "error": None, "metrics": {}, "proxy_cpu_s": None, "wall_s": None}
    try:
        metrics, cpu, wall, raw = SCENARIOS[args.scenario](args)
        if cpu is not None and wall and args.proxy_cores:
            # How much of the proxy's cores the scenario kept busy: the headroom left.
            metrics["busy_pct"] = 100 * cpu / wall / args.proxy_cores
        record.update(ok=True, metrics=metrics, proxy_cpu_s=cpu, wall_s=wall, raw=raw)
        errors = raw.get("errors_total", 0) if isinstance(raw, dict) else 0
        warnings = [f"{errors} wrk errors: {raw['errors']}"] if errors else []
        served = metrics.get("rps", metrics.get("cps", 0))
        if args.scenario in ("fixedrate", "fixedclose") and served < 0.9 * args.rate:
            warnings.append(f"served {served:.0f} of the {args.rate:.0f} requests/s offered: "
                            "the load generator or the proxy did not keep up; a lower --rate compares CPU "
                            "at a rate every target serves")
        if warnings:
            record["warning"] = "; ".join(warnings)
        line = _fmt(metrics) + (f", proxy CPU {cpu:.2f} s" if cpu is not None else "")
        if warnings:
            line += f"  [{record['warning']}]"
        print(f"    {args.target:13} {args.scenario:10} {line}", flush=True)
    except LoadError as e:
        record["error"] = str(e)
        print(f"    {args.target:13} {args.scenario:10} FAILED: {e}", flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
