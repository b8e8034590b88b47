#!/usr/bin/env python3
"""Turns the bench's raw per-round records into results.md, results.json and results.svg.

    report.py --raw raw.jsonl --meta meta.tsv --out DIR

Each figure is the median over the rounds that succeeded, and is also given as a ratio to the
best peer: the better of HAProxy and nginx for that figure (the higher one where higher is
better, the lower one where lower is better); ringlb, ringlb-copy, ringlb-splice, ringlb-pack
and ringlb-nolog (the defaults, the copy and splice relay modes, spread = "pack", and no
connection log) are each compared with that peer, never with each other; ringlb-alt (another
binary or setting, tried side by side) is compared with that peer and with ringlb. The Markdown table is printed on stdout too.
Exit status 3 when a run failed (the files are written all the same).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
from xml.sax.saxutils import escape

# Every target in the order of the tables: its label, its label under the bars of the chart
# (one line each; "ringlb-splice" is too wide for one slot), and its colour.
TARGET_INFO = {
    "direct": ("direct", ["direct"], "#9e9e9e"),
    "ringlb": ("ringlb", ["ringlb"], "#e6550d"),
    "ringlb-copy": ("ringlb-copy", ["ringlb-", "copy"], "#fdae6b"),
    "ringlb-splice": ("ringlb-splice", ["ringlb-", "splice"], "#756bb1"),
    "ringlb-pack": ("ringlb-pack", ["ringlb-", "pack"], "#d6616b"),
    "ringlb-nolog": ("ringlb-nolog", ["ringlb-", "nolog"], "#fd8d3c"),
    "ringlb-alt": ("ringlb-alt", ["ringlb-", "alt"], "#8c6d31"),
    "haproxy": ("HAProxy", ["HAProxy"], "#3182bd"),
    "nginx": ("nginx stream", ["nginx"], "#31a354"),
}
TARGETS = list(TARGET_INFO)
TARGET_LABEL = {t: info[0] for t, info in TARGET_INFO.items()}
AXIS_LABEL = {t: info[1] for t, info in TARGET_INFO.items()}
COLOUR = {t: info[2] for t, info in TARGET_INFO.items()}
PEERS = ["haproxy", "nginx"]
RINGLB = [t for t in TARGETS if t.startswith("ringlb")]  # each gets a "vs best peer" column

SCENARIO_LABEL = {
    "idle": "idle ({idle_conns} conns)",
    "bulk": "bulk (100 MiB, 4 conns)",
    "keepalive": "keep-alive (100 B, 50 conns)",
    "connclose": "conn per request (50 conns)",
    "redis": "redis (SET+GET, 50 conns)",
    "fixedrate": "fixed rate ({fixed_rate} req/s offered, 100 B)",
    "fixedclose": "fixed rate, conn per request ({fixed_close_rate} conn/s offered)",
}

# (scenario, key in the record's metrics, what it is, higher is better)
METRICS = [
    ("bulk", "gbps", "GB/s", True),
    ("bulk", "cpu_s_per_gb", "proxy CPU s per GB", False),
    ("bulk", "busy_pct", "proxy cores busy %", False),
    ("keepalive", "rps", "req/s", True),
    ("keepalive", "p50_ms", "p50 latency ms", False),
    ("keepalive", "p99_ms", "p99 latency ms", False),
    ("keepalive", "cpu_us_per_req", "proxy CPU µs per request", False),
    ("keepalive", "busy_pct", "proxy cores busy %", False),
    ("connclose", "cps", "connections/s", True),
    ("connclose", "p50_ms", "p50 latency ms", False),
    ("connclose", "p99_ms", "p99 latency ms", False),
    ("connclose", "cpu_us_per_conn", "proxy CPU µs per connection", False),
    ("connclose", "busy_pct", "proxy cores busy %", False),
    ("redis", "rps", "req/s", True),
    ("redis", "p50_ms", "p50 latency ms", False),
    ("redis", "p99_ms", "p99 latency ms", False),
    ("redis", "cpu_us_per_req", "proxy CPU µs per request", False),
    ("redis", "busy_pct", "proxy cores busy %", False),
    ("fixedrate", "rps", "req/s served", True),
    ("fixedrate", "p50_ms", "p50 latency ms", False),
    ("fixedrate", "p99_ms", "p99 latency ms", False),
    ("fixedrate", "cpu_us_per_req", "proxy CPU µs per request", False),
    ("fixedrate", "busy_pct", "proxy cores busy %", False),
    ("fixedclose", "cps", "connections/s served", True),
    ("fixedclose", "p50_ms", "p50 latency ms", False),
    ("fixedclose", "p99_ms", "p99 latency ms", False),
    ("fixedclose", "cpu_us_per_conn", "proxy CPU µs per connection", False),
    ("fixedclose", "busy_pct", "proxy cores busy %", False),
    ("idle", "rss_kib_per_conn", "proxy RSS KiB per connection", False),
]


def fmt(v):
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


def fmt_ratio(r):
    return "" if r is None else f"{r:.2f}x"


def read_meta(path):
    meta = {}
    with open(path) as f:
        for line in f:
            if "\t" in line:
                k, v = line.rstrip("\n").split("\t", 1)
                meta[k] = v
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    u = os.uname()
    meta["kernel"] = f"{u.sysname} {u.release} {u.machine}"
    meta["cpu_model"] = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    meta["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return meta


def summarise(runs, meta):
    targets = [t for t in TARGETS if t in meta.get("targets", "").split()]
    scenarios = meta.get("scenarios", "").split()
    metrics = [m for m in METRICS if m[0] in scenarios]
    per_round, median, ratio, best_peer, alt_vs_ringlb = {}, {}, {}, {}, {}
    for t in targets:
        for s, key, _, _ in metrics:
            vals = [r["metrics"][key] for r in sorted(runs, key=lambda r: r["round"])
                    if r["target"] == t and r["scenario"] == s and r["ok"] and key in r["metrics"]]
            per_round.setdefault(t, {}).setdefault(s, {})[key] = vals
            median.setdefault(t, {}).setdefault(s, {})[key] = statistics.median(vals) if vals else None
    for s, key, _, higher in metrics:
        peers = [(median[p][s][key], p) for p in PEERS if p in median and median[p][s][key] is not None]
        best = (max if higher else min)(peers) if peers else None
        best_peer.setdefault(s, {})[key] = best[1] if best else None
        for t in targets:
            ratio.setdefault(t, {}).setdefault(s, {})[key] = paired_ratio(runs, t, best[1] if best else None, s, key)
        if "ringlb-alt" in targets and "ringlb" in targets:
            alt_vs_ringlb.setdefault(s, {})[key] = paired_ratio(runs, "ringlb-alt", "ringlb", s, key)
    return targets, metrics, per_round, median, ratio, best_peer, alt_vs_ringlb


def paired_ratio(runs, target, peer, scenario, key):
    """The median over the rounds of target / peer in the same round (rounds where both ran).

    The targets of a round run back to back, so a stretch of noise from elsewhere on the machine
    slows both sides of a round's ratio; the ratio of two medians would pair the target's quiet
    rounds with the peer's noisy ones.
    """
    if peer is None:
        return None

    def by_round(t):
        return {r["round"]: r["metrics"][key] for r in runs
                if r["target"] == t and r["scenario"] == scenario and r["ok"] and key in r["metrics"]}
    mine, theirs = by_round(target), by_round(peer)
    ratios = [mine[n] / theirs[n] for n in mine if n in theirs and theirs[n]]
    return statistics.median(ratios) if ratios else None


def layout_text(meta):
    if meta.get("layout") == "dedicated":
        return (f"dedicated: every proxy on CPU(s) {meta.get('proxy_cpus', '?')} only (taskset), the load "
                f"generator and the backends on CPU(s) {meta.get('load_cpus', '?')}")
    return "shared: the proxy, the load generator and the backends share every CPU"


def no_proxy(target, key):
    """Figures of the proxy itself (its CPU, its memory) do not exist for the direct runs."""
    return target == "direct" and (key.startswith("cpu_") or key.startswith("rss_") or key == "busy_pct")


def verdict(r, higher):
    if r is None:
        return ""
    if 0.97 <= r <= 1.03:
        return "on par"
    return "better" if (r > 1) == higher else "worse"


def markdown(meta, runs, targets, metrics, per_round, median, ratio, best_peer, alt_vs_ringlb):
    idle_conns = meta.get("idle_conns", "?")
    lines = ["# ringlb load test", ""]
    lines += [
        f"- **Date:** {meta['date']}",
        f"- **Command:** `{meta.get('command', '?')}`",
        f"- **Machine:** {meta['kernel']}; CPU {meta['cpu_model']}, {meta.get('cpus', '?')} CPUs; "
        f"open-file limit {meta.get('nofile', '?')}",
        f"- **Layout:** {layout_text(meta)}",
    ]
    versions = []
    if "version_ringlb" in meta:
        versions.append(f"{meta['version_ringlb']} (`{meta.get('ringlb_bin', '?')}`; repository at {meta.get('git', '?')})")
    for key, name in (("haproxy", "HAProxy"), ("nginx", "nginx"), ("wrk", "wrk"), ("redis", "Redis")):
        if f"version_{key}" in meta:
            versions.append(f"{name} {meta[f'version_{key}']}")
    lines.append("- **Versions:** " + "; ".join(versions))
    if "ringlb_alt_bin" in meta:
        lines.append(f"- **ringlb-alt:** `{meta['ringlb_alt_bin']}` with the ringlb configuration plus "
                     f"`{meta.get('alt_config') or '(nothing)'}`")
    lines.append(
        f"- **Runs:** {meta.get('rounds', '?')} round(s), {meta.get('duration_s', '?')} s of load per scenario "
        f"(warm-up {meta.get('warmup_s', '0')} s, {meta.get('pause_s', '?')} s without load after each), redis-benchmark -n {meta.get('redis_requests', '?')} per test, "
        f"{idle_conns} idle connections; {meta.get('proxy_threads', meta.get('cpus', '?'))} thread(s) per proxy "
        f"(ringlb workers, HAProxy nbthread, nginx worker_processes); every figure is the median over the rounds")
    lines.append("")
    table = ["## Results", "",
             "Each cell: the median over the rounds, and in brackets its ratio to the **best peer** (the "
             "better of HAProxy and nginx on that row by median; the \"best peer\" column says which): the "
             "median over the rounds of the two figures' ratio within a round. ↑ higher is better, ↓ lower "
             "is better: on a ↓ row a ratio below 1.00x beats the peer.", ""]
    ours = [t for t in RINGLB if t in targets]
    head = ["scenario", "metric"] + [TARGET_LABEL[t] for t in targets] + ["best peer"]
    head += [f"{TARGET_LABEL[t]} vs best peer" for t in ours]
    if alt_vs_ringlb:
        head.append("ringlb-alt vs ringlb")
    table.append("| " + " | ".join(head) + " |")
    table.append("| " + " | ".join(["---", "---"] + ["---:"] * len(targets) + ["---"] * (len(head) - 2 - len(targets))) + " |")
    last_s = None
    for s, key, what, higher in metrics:
        label = SCENARIO_LABEL[s].format(idle_conns=idle_conns, fixed_rate=meta.get("fixed_rate", "?"),
                                     fixed_close_rate=meta.get("fixed_close_rate", "?")) if s != last_s else ""
        last_s = s
        row = [label, f"{what} {'↑' if higher else '↓'}"]
        for t in targets:
            v, r = median[t][s][key], ratio[t][s][key]
            if v is None:
                row.append("no proxy" if no_proxy(t, key) else "failed")
            else:
                row.append(fmt(v) + (f" ({fmt_ratio(r)})" if r is not None else ""))
        bp = best_peer[s][key]
        row.append(TARGET_LABEL[bp] if bp else "n/a")
        for t in ours:
            r = ratio[t][s][key]
            row.append(f"{TARGET_LABEL[t]} {fmt_ratio(r)} ({verdict(r, higher)})" if r is not None else "n/a")
        if alt_vs_ringlb:
            r = alt_vs_ringlb[s][key]
            row.append(f"{fmt_ratio(r)} ({verdict(r, higher)})" if r is not None else "n/a")
        table.append("| " + " | ".join(row) + " |")
    table.append("")
    lines += table

    if int(meta.get("rounds", "1")) > 1:
        lines += ["## Every round", "", "The values of rounds 1, 2, ... in order, for judging the spread.", ""]
        lines.append("| scenario | metric | " + " | ".join(TARGET_LABEL[t] for t in targets) + " |")
        lines.append("| --- | --- | " + " | ".join("---:" for _ in targets) + " |")
        for s, key, what, higher in metrics:
            cells = [" / ".join(fmt(v) for v in per_round[t][s][key]) or "—" for t in targets]
            lines.append(f"| {s} | {what} | " + " | ".join(cells) + " |")
        lines.append("")

    problems = [r for r in runs if not r["ok"] or r.get("warning")]
    if problems:
        lines += ["## Failures and warnings", ""]
        for r in sorted(problems, key=lambda r: (r["round"], TARGETS.index(r["target"]) if r["target"] in TARGETS else 9)):
            what = f"failed: {r['error']}" if not r["ok"] else r["warning"]
            lines.append(f"- round {r['round']}, {r['target']}, {r['scenario']}: {what}")
        lines.append("")

    lines += [
        "## How this was measured",
        "",
        "- Backends: one nginx (one worker per CPU, sendfile) serving a 100-byte and a 100 MiB file on "
        "3 ports, and 2 redis-servers without persistence. **direct** goes straight to the first of "
        "each; the proxies balance over all of them with least-connections, each on its own port.",
        "- **ringlb**, **ringlb-copy** and **ringlb-splice** are the same binary with the same "
        "configuration (workers, pools, health checks) but for the relay mode: the default "
        "(`auto`), `relay = \"copy\"` and `relay = \"splice\"`, side by side in the same rounds. "
        "**ringlb-pack** is the default relay with `spread = \"pack\"`: as few workers as keep up "
        "take the connections, where by default (`even`) every worker takes its share, as HAProxy "
        "and nginx do. **ringlb-nolog** is the defaults with `connection_log = false`: ringlb "
        "writes a line per connection by default (to a file here), HAProxy and nginx here none. "
        "Each is compared with the best peer, not with the others; `configs/ringlb*.toml` are their "
        "configurations. **ringlb-alt**, when asked for, is another binary (`RINGLB_ALT_BIN`) or "
        "setting (`--alt-config`) on the ringlb configuration, compared with ringlb as well.",
        "- Every proxy is started once and runs for the whole bench, each on its own ports (an idle "
        "one costs nothing measurable). Every round runs the idle scenario, then bulk, keep-alive, "
        "connection per request and redis, each through every target back to back (the targets in "
        "an order rotated from round to round), and each run is followed by a pause without load "
        "(`--pause`, so that ringlb's `spread = \"pack\"`, which adapts to its load, starts each run "
        "settled). The fixed-rate rounds come last, the same way. This machine's speed changes from "
        "minute to minute with load from elsewhere: running the targets of a round close together "
        "and taking the median of the per-round ratios keeps that out of the comparison.",
        "- **Proxy CPU** is utime + stime from `/proc/PID/stat` (fields 14 and 15) summed over every "
        "process and thread of the proxy (nginx master and workers), sampled just before and just "
        "after the load. **Busy %** is that CPU time over the wall time of the cores the proxy has "
        "(100% = they were never idle). " + ("With the dedicated layout the proxy's cores run nothing "
        "else, so its throughput and latency are its own; " if meta.get("layout") == "dedicated" else
        "The load generator, the backends and the proxy share the CPUs, so throughput is bounded by "
        "that sharing; ") + "CPU per GB and per request is the figure that carries over to another machine.",
        "- **Fixed rate:** wrk sends on a schedule of the offered rate (60% of the slowest proxy's "
        "keep-alive rate in the same run unless `--rate` set it; `wrk_paced.lua`: each request "
        "waits for the next slot, whichever connection is free, over one connection per 5 ms of "
        "schedule), so every proxy gets the same load and CPU per request and latency compare "
        "efficiency without the load generator deciding the rate. A run that served less than 90% "
        "of the offered rate is listed under warnings. **Fixed rate, conn per request** does the same "
        "with `Connection: close` (60% of the slowest proxy's connection-per-request rate unless "
        "`--close-rate` set it): each request on a new connection, which waits for its slot.",
        "- **GB/s** counts every byte wrk read (10^9 bytes per GB); headers add ~200 bytes per 100 MiB. "
        "Latencies are wrk's (keep-alive, connection per request) and redis-benchmark's percentiles.",
        "- **Idle:** connections opened one by one to the proxy's Redis listener, each checked with a "
        "PING/+PONG round trip (so it is connected through to a backend), held, RSS sampled, then "
        "checked again with a second PING. RSS per connection = (VmRSS summed over the proxy's "
        f"processes with the connections − before) / {idle_conns}.",
        "- The generated configurations are in `configs/` next to this file (`$TMPDIR` stands for "
        "the temporary directory of the run); `results.json` has every round's raw numbers.",
        "",
    ]
    return "\n".join(lines), "\n".join(table)


def svg(meta, targets, metrics, median, ratio):
    cols = 4
    pw, ph = max(300, 40 + 60 * len(targets)), 230  # panel size: about 60 px per bar
    top = 78
    rows = (len(metrics) + cols - 1) // cols
    width, height = cols * pw + 20, top + rows * ph + 10
    ours = " and ".join(TARGET_LABEL[t] for t in RINGLB if t in targets) or "ringlb"
    title = f"{ours} vs HAProxy and nginx stream"
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
         f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
         f'<text x="12" y="26" font-size="19" font-weight="bold">{escape(title)}: '
         f'median of {escape(meta.get("rounds", "?"))} round(s), {escape(meta.get("duration_s", "?"))} s each</text>',
         f'<text x="12" y="46" font-size="12" fill="#555">{escape(meta["date"])} · {escape(meta["kernel"])} · '
         f'{escape(meta["cpu_model"])} × {escape(meta.get("cpus", "?"))} CPUs · {escape(meta.get("layout", "shared"))} layout · '
         f'x = ratio to the best of HAProxy and nginx</text>']
    x = 12
    for t in targets:
        o.append(f'<rect x="{x}" y="56" width="14" height="14" fill="{COLOUR[t]}"/>')
        o.append(f'<text x="{x + 19}" y="68" font-size="13">{escape(TARGET_LABEL[t])}</text>')
        x += 30 + 8 * len(TARGET_LABEL[t])
    for i, (s, key, what, higher) in enumerate(metrics):
        px, py = 10 + (i % cols) * pw, top + (i // cols) * ph
        o.append(f'<rect x="{px + 2}" y="{py + 2}" width="{pw - 8}" height="{ph - 8}" fill="#fafafa" stroke="#ddd"/>')
        title = SCENARIO_LABEL[s].split(" (")[0]
        o.append(f'<text x="{px + 12}" y="{py + 22}" font-size="13" font-weight="bold">{escape(title)}</text>')
        o.append(f'<text x="{px + 12}" y="{py + 38}" font-size="12" fill="#444">{escape(what)} '
                 f'({"higher" if higher else "lower"} is better)</text>')
        vals = [median[t][s][key] for t in targets]
        vmax = max([v for v in vals if v is not None and v > 0], default=1.0)
        base_y, bar_h = py + ph - 38, ph - 110
        slot = (pw - 30) / max(len(targets), 1)
        for j, t in enumerate(targets):
            v = median[t][s][key]
            bx = px + 16 + j * slot + slot * 0.15
            bw = slot * 0.7
            cx = bx + bw / 2
            if v is None:
                note = "no proxy" if no_proxy(t, key) else "failed"
                o.append(f'<text x="{cx:.1f}" y="{base_y - 4}" font-size="11" fill="#999" text-anchor="middle">{note}</text>')
            else:
                h = max(bar_h * max(v, 0) / vmax, 1)
                o.append(f'<rect x="{bx:.1f}" y="{base_y - h:.1f}" width="{bw:.1f}" height="{h:.1f}" fill="{COLOUR[t]}">'
                         f'<title>{escape(TARGET_LABEL[t])}: {fmt(v)} {escape(what)}</title></rect>')
                o.append(f'<text x="{cx:.1f}" y="{base_y - h - 17:.1f}" font-size="12" font-weight="bold" '
                         f'text-anchor="middle">{fmt(v)}</text>')
                r = ratio[t][s][key]
                if r is not None:
                    o.append(f'<text x="{cx:.1f}" y="{base_y - h - 4:.1f}" font-size="10.5" fill="#555" '
                             f'text-anchor="middle">{fmt_ratio(r)}</text>')
            for k, part in enumerate(AXIS_LABEL[t]):
                o.append(f'<text x="{cx:.1f}" y="{base_y + 15 + 12 * k}" font-size="11" text-anchor="middle">'
                         f'{escape(part)}</text>')
        o.append(f'<line x1="{px + 12}" y1="{base_y}" x2="{px + pw - 14}" y2="{base_y}" stroke="#888"/>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    runs = []
    if os.path.exists(args.raw):
        with open(args.raw) as f:
            runs = [json.loads(line) for line in f if line.strip()]
    meta = read_meta(args.meta)
    targets, metrics, per_round, median, ratio, best_peer, alt_vs_ringlb = summarise(runs, meta)
    md, table = markdown(meta, runs, targets, metrics, per_round, median, ratio, best_peer, alt_vs_ringlb)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.svg"), "w") as f:
        f.write(svg(meta, targets, metrics, median, ratio))
    doc = {
        "meta": meta,
        "metrics": [{"scenario": s, "key": k, "label": w, "better": "higher" if h else "lower"}
                    for s, k, w, h in metrics],
        "median": median,
        "ratio_to_best_peer": ratio,
        "best_peer": best_peer,
        "ringlb_alt_to_ringlb": alt_vs_ringlb,
        "per_round": per_round,
        "runs": runs,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    head = md.split("## Results")[0].rstrip()
    print()
    print(head)
    print()
    print(table)
    failed = [r for r in runs if not r["ok"]]
    if failed:
        print(f"{len(failed)} run(s) failed; see 'Failures and warnings' in results.md", file=sys.stderr)
        sys.exit(3)  # the bench exits non-zero, after the results are written


if __name__ == "__main__":
    main()
