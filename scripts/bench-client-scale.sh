#!/usr/bin/env bash
# Setup rate and memory of `c1m bench` with several worker processes, against several
# `c1m serve --connect-only --reuse-port` processes sharing one port (one server process can
# hold only ~19,000 sockets under this machine's nofile limit of 20,000).
#
#   scripts/bench-client-scale.sh [CONNECTIONS] [BENCH_PROCS] [SERVER_PROCS] [RATE]
#   (defaults: 100000 6 7 50000)
#
# Memory: RSS of every bench process (parent + workers) and every server process, sampled
# every 200 ms while the connections are held, maximum kept.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
PROCS=${2:-6}
SERVERS=${3:-7}
RATE=${4:-50000}
PORT=${PORT:-18089}
cargo build --release -q
BIN=target/release/c1m
OUT=$(mktemp -d)
source scripts/lib.sh

SERVER_PIDS=()
cleanup() { kill "${SERVER_PIDS[@]}" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq "$SERVERS"); do
  $BIN serve --workers 1 --listen 127.0.0.1:$PORT --reuse-port --connect-only >/dev/null 2>>"$OUT/serve.err" &
  SERVER_PIDS+=($!)
done
sleep 1
SERVER_BASE=$(rss_kib "${SERVER_PIDS[@]}")
DURATION=$(( N / RATE + 8 ))s
$BIN bench --url ws://127.0.0.1:$PORT/ -c "$N" --procs "$PROCS" --rate "$RATE" --duration "$DURATION" \
  --source-ips 127.0.0.2-127.0.0.101 --quiet --json "$OUT/bench.json" >"$OUT/bench.txt" &
BENCH=$!
SMAX=0; BMAX=0
while kill -0 $BENCH 2>/dev/null; do
  s=$(rss_kib "${SERVER_PIDS[@]}")
  b=$(rss_kib $BENCH $(pgrep -P $BENCH || true))
  [ "$s" -gt "$SMAX" ] && SMAX=$s
  [ "$b" -gt "$BMAX" ] && BMAX=$b
  sleep 0.2
done
wait $BENCH
cleanup; wait 2>/dev/null || true
trap - EXIT
grep -A3 "connections.active\|connections.errors\|setup.ramp" "$OUT/bench.txt" | head -20
python3 - "$OUT/bench.json" "$N" "$PROCS" "$SERVERS" "$SERVER_BASE" "$SMAX" "$BMAX" <<'PY'
import json, sys
path, n, procs, servers, sbase, smax, bmax = sys.argv[1], *map(int, sys.argv[2:])
r = json.load(open(path))["snapshot"]
print(f"connections  {r['established']} of {n} established, errors {r['errors'] or 0}")
print(f"setup        {r['established']} in {r['ramp_secs']:.2f} s = {r['established'] / r['ramp_secs']:.0f} connections/s ({procs} bench processes)")
print(f"bench RSS    {bmax} KiB over {procs + 1} processes: {bmax * 1024 / n:.0f} B per connection")
print(f"server RSS   {sbase} KiB idle -> {smax} KiB over {servers} processes: {(smax - sbase) * 1024 / n:.0f} B per connection")
PY
rm -rf "$OUT"
