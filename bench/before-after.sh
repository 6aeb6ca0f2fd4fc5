#!/usr/bin/env bash
# Before/after a change: `c1m demo` of an earlier revision and of this tree, interleaved
# (before, after, before, after, ...) so that drift of the machine hits both alike, and a
# markdown table of every run (for BENCHMARKS.md).
#
#   bench/before-after.sh REV [SCALE] [PAIRS]     (defaults: SCALE 190000, PAIRS 2)
#
# REV is built in a temporary git worktree into target/before-after/REV (kept, so a rerun
# skips the build). As root it first runs `c1m tune --apply` for SCALE (it changes
# sysctls). Outputs are kept in bench/out/before-after/.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: bench/before-after.sh REV [SCALE] [PAIRS]}
SCALE=${2:-190000}
PAIRS=${3:-2}
ROOT=$PWD
OLD_TARGET=$ROOT/target/before-after/$REV
OLD=$OLD_TARGET/release/c1m
if [ ! -x "$OLD" ]; then
  src=$(mktemp -d)
  git worktree add -q --detach "$src" "$REV"
  (cd "$src" && CARGO_TARGET_DIR=$OLD_TARGET cargo build --release -q -p c1m)
  git worktree remove --force "$src"
fi
cargo build --release -q -p c1m
NEW=$ROOT/target/release/c1m
OUT=bench/out/before-after
mkdir -p "$OUT"
if [ "$(id -u)" = 0 ]; then
  "$NEW" tune --connections "$SCALE" --apply >"$OUT/tune.txt"
fi
labels=()
for i in $(seq 1 "$PAIRS"); do
  for side in before after; do
    bin=$NEW
    [ "$side" = before ] && bin=$OLD
    label=$side-$i
    echo "== $label: c1m demo --connections $SCALE" >&2
    "$bin" demo --connections "$SCALE" --rate 50000 --json "$OUT/demo-$label.json" \
      >"$OUT/demo-$label.txt" 2>"$OUT/demo-$label.err"
    labels+=("$label")
  done
done
python3 bench/table.py "$OUT" "${labels[@]}"
