#!/usr/bin/env bash
# A short, bounded fuzz run of every target in fuzz/ (libFuzzer through cargo-fuzz: frame
# decoder, handshake parsers, permessage-deflate, the TLS record path), seeded
# from fuzz/seeds/. A crash fails the script; its input is left in fuzz/artifacts/ and
# should become a regression test.
#
#   scripts/fuzz-smoke.sh [SECONDS_PER_TARGET]      (default 20)
#
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 lets this machine's stable toolchain
# (the only one that can be installed here) provide them.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
for target in frame_decoder handshake deflate tls_records; do
  corpus=target/fuzz-corpus/$target
  mkdir -p "$corpus"
  echo "== fuzz $target for ${SECONDS_PER_TARGET}s"
  log=target/fuzz-$target.log
  if ! cargo fuzz run "$target" --fuzz-dir fuzz "$corpus" "fuzz/seeds/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=4096 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $target failed: see fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E "^Done" "$log"
done
