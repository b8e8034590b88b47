#!/usr/bin/env bash
# Starts the demo backends that a ringlb config points at, then ringlb itself in the
# foreground. Ctrl-C (SIGINT) drains ringlb; the backends are stopped when it exits.
# Usage: scripts/run-demo.sh [CONFIG]
# The binaries come from BIN_DIR (default target/release, which `make run` builds).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-config/ringlb.toml}
bin=${BIN_DIR:-target/release}

# What the config sets up, as ringlb itself reads it (not by grepping the TOML).
summary=$("$bin/ringlb" check --config "$config")
mapfile -t backends < <(sed -n 's/^  pool [^ ]* backends: //p' <<<"$summary" | tr ',' '\n' | sed 's/ (weight [0-9]*)//; s/^ *//; /^$/d' | sort -u)
mapfile -t listens < <(sed -n 's/^  listener [^ ]* on \([^ ]*\) .*/\1/p' <<<"$summary")
"$bin/ringlb-demo-backend" --greet "${backends[@]}" &
demo=$!
trap 'kill "$demo" 2>/dev/null || true' EXIT

listen=${listens[0]}
host=${listen%:*}; host=${host#[}; host=${host%]}
port=${listen##*:}
cat <<MSG

ringlb is starting on ${listens[*]} in front of ${#backends[@]} demo backends (${backends[*]}).
Each backend says which one answered, then echoes what you send. Try, in another terminal:

    exec 3<>/dev/tcp/$host/$port; echo hello >&3; timeout 1 cat <&3; exec 3<&-
    printf 'hello\n' | nc -q1 $host $port          # if nc is installed

Stop with Ctrl-C: ringlb stops accepting, lets open connections finish, then exits.

MSG
"$bin/ringlb" run --config "$config"
