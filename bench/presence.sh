#!/usr/bin/env bash
# What a presence member costs (issue 17): N Pusher clients (default 190,000) on
# `c1m serve --workers ceil(N/19000) --pusher-app …`, M to a channel (default 10, so
# N/M channels), held without broadcasts; runs in turn: "public" (channels news-0 …,
# no signature) and "presence" (presence-bench-0 …, each subscription signed by the
# bench with the app's secret, one member per connection). Reports the server's memory
# per connection (RSS of master and workers with all N in and settled, minus before
# any, over N) and the setup rate; a member's cost is the difference between the two.
#
# Presence is quadratic in a channel's size by design: the k-th joiner is sent the k
# members so far, and the k-1 others a member_added each. With M = 1,000 (the most a
# channel holds) the member lists and events in flight dominate the memory measured,
# not the table; M = 10 measures the table. Try both.
#
#   bench/presence.sh [--connections N] [--members M] [--kinds "public presence …"]
# Run as root (it applies `c1m tune --apply`). Listens on 127.0.0.1 only; stops what it
# started by PID. Writes bench/out/presence/.
set -euo pipefail
cd "$(dirname "$0")/.."
N=190000
M=10
KINDS="public presence public presence"
while [ $# -gt 0 ]; do
  case $1 in
    --connections) N=$2; shift 2 ;;
    --members) M=$2; shift 2 ;;
    --kinds) KINDS=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
source scripts/lib.sh
cargo build --release -q
BIN=target/release/c1m
OUT=bench/out/presence
mkdir -p "$OUT"
$BIN tune --apply --connections "$N" >"$OUT/tune.txt" 2>&1 || true
stop_started_on_exit
PROCS=$(( (N + 18999) / 19000 ))
CHANNELS=$(( (N + M - 1) / M ))
connected() {
  curl -s --max-time 2 "http://127.0.0.1:$PORT/stats" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])' 2>/dev/null || echo 0
}
echo "| run ($N clients, $CHANNELS channels of $M) | established | errors | setup /s | server memory / connection | of which the master |"
echo "|---|---:|---:|---:|---:|---:|"
for kind in $KINDS; do
  case $kind in
    public) channel=news; sign=() ;;
    presence) channel=presence-bench; sign=(--pusher-secret bench-secret) ;;
    *) echo "unknown kind $kind" >&2; exit 2 ;;
  esac
  PORT=$(free_port)
  log="$OUT/$kind-$N.server.log"
  $BIN serve --listen "127.0.0.1:$PORT" --workers "$PROCS" --connect-only --ping-interval 0s \
    --idle-timeout 0s --stats-interval 60s --pusher-app 1:bench-key:bench-secret >"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do grep -q listening "$log" && break; sleep 0.1; done
  sleep 1
  rss0=$(rss_kib "$SERVER_PID" $(pgrep -P "$SERVER_PID" || true))
  master0=$(rss_kib "$SERVER_PID")
  $BIN bench --url "ws://127.0.0.1:$PORT/app/bench-key" --quiet --connections "$N" \
    --procs "$PROCS" --rate 20000 --messages 1 --duration 300s --source-ips 127.0.0.2-127.0.0.60 \
    --connect-timeout 30s --pusher-channel "$channel" --pusher-channels "$CHANNELS" "${sign[@]}" \
    --json "$OUT/$kind-$N.json" >"$OUT/$kind-$N.bench.txt" 2>&1 &
  BENCH_PID=$!
  for _ in $(seq 600); do [ "$(connected)" -ge "$N" ] && break; sleep 0.5; done
  # The subscriptions (and presence joins, member lists and events) follow the
  # upgrades: let them land, until the server's CPU is quiet.
  for _ in $(seq 120); do
    c0=$(cpu_secs "$SERVER_PID" $(pgrep -P "$SERVER_PID" || true)); sleep 1
    c1=$(cpu_secs "$SERVER_PID" $(pgrep -P "$SERVER_PID" || true))
    python3 -c "import sys; sys.exit(0 if $c1 - $c0 < 0.05 else 1)" && break
  done
  rss1=$(rss_kib "$SERVER_PID" $(pgrep -P "$SERVER_PID" || true))
  master1=$(rss_kib "$SERVER_PID")
  # Nothing is published on these channels: the bench holds them until told (SIGINT:
  # it stops and still writes its result).
  kill -INT "$BENCH_PID" 2>/dev/null || true
  wait "$BENCH_PID" 2>/dev/null || true
  BENCH_PID=""
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
  python3 - "$OUT/$kind-$N.json" "$kind" "$N" "$rss0" "$rss1" "$master0" "$master1" <<'PY'
import json, sys
path, kind = sys.argv[1], sys.argv[2]
n, rss0, rss1, master0, master1 = map(int, sys.argv[3:8])
s = json.load(open(path))["snapshot"]
setup = s["established"] / s["ramp_secs"] if s.get("ramp_secs") else 0
print(f"| {kind} | {s['established']:,} | {sum(s['errors'].values())} | {setup:,.0f} "
      f"| {(rss1 - rss0) * 1024 / n:.0f} B | {(master1 - master0) * 1024 / n:.0f} B |")
PY
  sleep 3
done
