#!/usr/bin/env python3
"""CPU time and resident memory of a process tree, read from /proc.

A proxy is measured as its root process (the PID the bench started: ringlb, the HAProxy
process, the nginx master) plus every descendant (nginx workers), and every thread of each,
since /proc/PID/stat of a process adds up all its threads.

    procstat.py cpu PID...   proxy CPU seconds (utime + stime), e.g. 12.34
    procstat.py rss PID...   VmRSS summed over the processes, in KiB
    procstat.py pids PID...  the processes counted
"""

import os
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2 :].split()


def tree(roots):
    """The given PIDs and all their descendants that are still alive."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(entry)
        except (OSError, ValueError):
            continue  # exited while we looked
        children.setdefault(int(fields[1]), []).append(int(entry))  # field 4: ppid
    found, todo = [], [int(p) for p in roots]
    while todo:
        pid = todo.pop()
        if pid in found or not os.path.exists(f"/proc/{pid}"):
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def cpu_seconds(roots):
    """utime + stime (fields 14 and 15 of /proc/PID/stat) of the tree, in seconds."""
    ticks = 0
    for pid in tree(roots):
        try:
            fields = _stat_fields(pid)
        except (OSError, ValueError):
            continue
        # fields[0] is field 3 (state), so field N is fields[N - 3].
        ticks += int(fields[14 - 3]) + int(fields[15 - 3])
    return ticks / CLK_TCK


def rss_kib(roots):
    """VmRSS of every process of the tree, summed, in KiB."""
    total = 0
    for pid in tree(roots):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def main(argv):
    if len(argv) < 3 or argv[1] not in ("cpu", "rss", "pids"):
        sys.exit(__doc__)
    roots = [int(p) for p in argv[2:]]
    if argv[1] == "cpu":
        print(f"{cpu_seconds(roots):.2f}")
    elif argv[1] == "rss":
        print(rss_kib(roots))
    else:
        print(" ".join(str(p) for p in tree(roots)))


if __name__ == "__main__":
    main(sys.argv)
