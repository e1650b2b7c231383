#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each on the stable toolchain (no sanitizer:
# libFuzzer's coverage guidance and Rust's own checks; panics and failed assertions are the
# findings). Prints one line per target: runs and crashes. Exits non-zero on any crash.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
status=0
for target in route_match headers backendcluster upstream_response request_head; do
  mkdir -p "corpus/$target"
  log=$(mktemp)
  if cargo fuzz run --sanitizer none --release "$target" "corpus/$target" "seeds/$target" \
      -- -max_total_time="$secs" >"$log" 2>&1; then
    crashes=0
  else
    crashes=1
    status=1
    grep -E "panicked|SUMMARY|Test unit written" "$log" || tail -30 "$log"
  fi
  runs=$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' || echo "?")
  echo "fuzz $target: $runs runs in ${secs}s, $crashes crash(es)"
  rm -f "$log"
done
exit "$status"
