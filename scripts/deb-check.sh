#!/usr/bin/env bash
# What CI checks of the package: `make deb` builds it, `dpkg -i` installs it on this machine,
# the installed config passes `ringlb check`, the manual page renders (man -l), the installed
# unit passes `systemd-analyze verify` with no warning, the `ringlb` user exists, and
# `dpkg --purge` removes it all again. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/install.sh
missing=()
command -v man >/dev/null || missing+=(man-db)
command -v adduser >/dev/null || missing+=(adduser)
command -v systemd-analyze >/dev/null || missing+=(systemd)
install_missing "" "${missing[@]}"
if dpkg -s ringlb >/dev/null 2>&1; then
    echo "a ringlb package is installed already; remove it first (dpkg --purge ringlb)" >&2
    exit 1
fi
deb=$(scripts/deb.sh | tail -1)
echo "built $deb ($(du -h "$deb" | cut -f1))"
trap 'dpkg --purge ringlb >/dev/null 2>&1 || true' EXIT
dpkg -i "$deb" >/dev/null
echo "ok   dpkg -i"
/usr/bin/ringlb check -c /etc/ringlb/ringlb.toml >/dev/null
echo "ok   ringlb check -c /etc/ringlb/ringlb.toml"
page=$(MANWIDTH=80 man -l /usr/share/man/man8/ringlb.8.gz 2>&1)
grep -q "ringlb - A layer-4 TCP load balancer" <<<"$page" || { echo "$page" >&2; exit 1; }
grep -q "SIGHUP reloads" <<<"$page" || { echo "$page" >&2; exit 1; }
echo "ok   man -l /usr/share/man/man8/ringlb.8.gz"
verify=$(systemd-analyze verify /lib/systemd/system/ringlb.service /lib/systemd/system/ringlb.socket 2>&1) || true
if [ -n "$verify" ]; then
    echo "systemd-analyze verify says:" >&2
    echo "$verify" >&2
    exit 1
fi
echo "ok   systemd-analyze verify ringlb.service ringlb.socket: no warning"
getent passwd ringlb >/dev/null || { echo "no ringlb user after install" >&2; exit 1; }
echo "ok   the ringlb system user exists"
grep -qx /etc/ringlb/ringlb.toml /var/lib/dpkg/info/ringlb.conffiles || { echo "not a conffile" >&2; exit 1; }
echo "ok   /etc/ringlb/ringlb.toml is a conffile"
dpkg --purge ringlb >/dev/null
trap - EXIT
[ ! -e /usr/bin/ringlb ] && [ ! -e /etc/ringlb/ringlb.toml ] && ! getent passwd ringlb >/dev/null \
    || { echo "dpkg --purge left files or the user behind" >&2; exit 1; }
echo "ok   dpkg --purge removed the binary, the config and the user"
echo "package checks passed"
