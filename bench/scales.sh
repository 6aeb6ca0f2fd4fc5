#!/usr/bin/env bash
# The headline benchmark: `c1m demo` at 10k, 100k and 1M connections on this machine, one
# after the other, and a markdown table of the results (for BENCHMARKS.md).
#
#   bench/scales.sh [SCALE...]          (default: 10000 100000 1000000)
#
# As root it first runs `c1m tune --apply` for the largest scale (it changes sysctls:
# somaxconn, tcp_max_syn_backlog, tcp_mem). Outputs are kept in bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALES=("${@:-10000 100000 1000000}")
read -r -a SCALES <<<"${SCALES[*]}"
cargo build --release -q
BIN=target/release/c1m
OUT=bench/out
mkdir -p "$OUT"
MAX=$(printf '%s\n' "${SCALES[@]}" | sort -n | tail -1)
if [ "$(id -u)" = 0 ]; then
  $BIN tune --connections "$MAX" --apply >"$OUT/tune.txt"
fi
for n in "${SCALES[@]}"; do
  echo "== c1m demo --connections $n" >&2
  $BIN demo --connections "$n" --rate 50000 --json "$OUT/demo-$n.json" >"$OUT/demo-$n.txt" 2>"$OUT/demo-$n.err"
done
python3 bench/table.py "$OUT" "${SCALES[@]}"
