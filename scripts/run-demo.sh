#!/usr/bin/env bash
# Starts the demo backends that a ringlb config points at, then ringlb itself in the
# foreground. Ctrl-C (SIGINT) drains ringlb; the backends are stopped when it exits.
# Usage: scripts/run-demo.sh [CONFIG]   (built binaries are expected in target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-config/ringlb.toml}
bin=target/release

"$bin/ringlb" check --config "$config" >/dev/null
# The demo serves every backend address the config lists.
mapfile -t backends < <(grep -o 'address *= *"[^"]*"' "$config" | cut -d'"' -f2)
"$bin/ringlb-demo-backend" --greet "${backends[@]}" &
demo=$!
trap 'kill "$demo" 2>/dev/null || true' EXIT

listen=$(grep -m1 -o 'bind *= *"[^"]*"' "$config" | cut -d'"' -f2)
host=${listen%:*}; host=${host#[}; host=${host%]}
port=${listen##*:}
cat <<MSG

ringlb is starting on $listen in front of ${#backends[@]} demo backends (${backends[*]}).
Each backend says which one answered, then echoes what you send. Try, in another terminal:

    exec 3<>/dev/tcp/$host/$port; echo hello >&3; timeout 1 cat <&3; exec 3<&-
    printf 'hello\n' | nc -q1 $host $port          # if nc is installed

Stop with Ctrl-C: ringlb stops accepting, lets open connections finish, then exits.

MSG
"$bin/ringlb" run --config "$config"
