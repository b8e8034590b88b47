#!/usr/bin/env bash
# Runs ringlb's fuzz targets (parsers of bytes that come from the network) with cargo-fuzz and
# libFuzzer for SECONDS each (default 30). Installs cargo-fuzz when missing. cargo-fuzz needs
# nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(proxy_header client_hello admission)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
    echo "== fuzz $target for ${seconds}s"
    mkdir -p "fuzz/corpus/$target"
    cargo fuzz run "$target" "fuzz/corpus/$target" -- -max_total_time="$seconds" -max_len=20000
done
