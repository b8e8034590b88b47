#!/usr/bin/env bash
# Builds the Debian package with dpkg-deb (no extra tool): the release binary, the systemd
# units, a commented /etc/ringlb/ringlb.toml (a conffile), the manual page ringlb(8) made from
# the command line's definition, and maintainer scripts that create the `ringlb` system user.
# Usage: scripts/deb.sh [OUTPUT_DIR]   (default: target/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/debian}
cargo build --release --bin ringlb
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

install -D -m 0755 target/release/ringlb "$root/usr/bin/ringlb"
strip --strip-debug "$root/usr/bin/ringlb"
install -D -m 0644 dist/ringlb.service "$root/lib/systemd/system/ringlb.service"
install -D -m 0644 dist/ringlb.socket "$root/lib/systemd/system/ringlb.socket"
install -D -m 0644 dist/ringlb.toml "$root/etc/ringlb/ringlb.toml"
mkdir -p "$root/usr/share/man/man8" "$root/usr/share/doc/ringlb"
target/release/ringlb manpage | gzip -9n >"$root/usr/share/man/man8/ringlb.8.gz"
install -m 0644 README.md "$root/usr/share/doc/ringlb/README.md"
install -m 0644 config/ringlb.toml "$root/usr/share/doc/ringlb/ringlb.example.toml"
cat >"$root/usr/share/doc/ringlb/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ringlb
License: MIT OR Apache-2.0
EOF

mkdir -p "$root/DEBIAN"
echo /etc/ringlb/ringlb.toml >"$root/DEBIAN/conffiles"
cat >"$root/DEBIAN/control" <<EOF
Package: ringlb
Version: $version
Architecture: $arch
Maintainer: ringlb developers <ringlb@localhost>
Depends: libc6 (>= 2.34), adduser
Section: net
Priority: optional
Installed-Size: $(du -sk "$root" | cut -f1)
Description: layer-4 TCP load balancer on io_uring
 ringlb balances TCP connections (databases, TLS passthrough) over backends with
 Maglev consistent hashing, least connections or round robin, one io_uring ring per
 core. Health checks (TCP, MySQL and PostgreSQL logins), reload and binary upgrade
 without dropping a connection, an admin API, backends by DNS name.
EOF
cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd ringlb >/dev/null; then
        adduser --system --group --no-create-home --home /nonexistent --quiet ringlb
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
EOF
cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
if [ "$1" = purge ] && getent passwd ringlb >/dev/null; then
    deluser --system --quiet ringlb >/dev/null 2>&1 || true
fi
EOF
cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop ringlb.service ringlb.socket >/dev/null 2>&1 || true
fi
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm" "$root/DEBIAN/prerm"
mkdir -p "$out"
deb="$out/ringlb_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
