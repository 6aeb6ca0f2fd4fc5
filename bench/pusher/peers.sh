#!/usr/bin/env bash
# c1m against other Pusher-compatible servers (issue 17), under the same `c1m bench`:
# N clients (default 19,000: one process each, the per-process open-file limit here) on
# one public channel, each server in turn on loopback, then ROUNDS events through the
# server's signed HTTP API (bench/pusher/publish.py, the stamp in each event's data).
# Reports established, errors, setup rate, server memory per connection (RSS with all in
# minus before any) and each round's fan-out (stamp to the last client).
#
# Servers: c1m (`c1m serve --workers 1 --pusher-app …`) and, where installed, Sockudo
# (`cargo install sockudo`, binary on PATH or in $SOCKUDO) and soketi (`soketi` on PATH).
#
#   bench/pusher/peers.sh [--connections N] [--rounds R] [--servers "c1m sockudo"]
# Listens on 127.0.0.1 only; stops what it started by PID. Writes bench/out/pusher-peers/.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=19000
ROUNDS=3
SERVERS="c1m sockudo c1m sockudo"
while [ $# -gt 0 ]; do
  case $1 in
    --connections) N=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
source scripts/lib.sh
cargo build --release -q
BIN=target/release/c1m
SOCKUDO=${SOCKUDO:-$(command -v sockudo || true)}
OUT=bench/out/pusher-peers
mkdir -p "$OUT"
$BIN tune --apply --connections "$N" >"$OUT/tune.txt" 2>&1 || true
APP=(42 bench-key bench-secret)
stop_started_on_exit
echo "| server ($N clients, one channel) | established | errors | setup /s | server memory / connection | fan-out per round, stamp to last client (s) | missed |"
echo "|---|---:|---:|---:|---:|---|---:|"
for server in $SERVERS; do
  PORT=$(free_port)
  log="$OUT/$server-$N.server.log"
  case $server in
    c1m)
      $BIN serve --listen "127.0.0.1:$PORT" --workers 1 --connect-only --ping-interval 0s \
        --idle-timeout 0s --stats-interval 60s --pusher-app "$(IFS=:; echo "${APP[*]}")" >"$log" 2>&1 &
      ;;
    sockudo)
      if [ -z "$SOCKUDO" ]; then echo "| sockudo | not installed (cargo install sockudo; see BENCHMARKS.md) | | | | | |"; continue; fi
      # Its rate limiter (20 connections per IP a minute by default) off and its default
      # app's connection cap above N: c1m has neither by default.
      RATE_LIMITER_ENABLED=false SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=$((N + 1000)) HOST=127.0.0.1 PORT=$PORT SOCKUDO_DEFAULT_APP_ID=${APP[0]} SOCKUDO_DEFAULT_APP_KEY=${APP[1]} \
        SOCKUDO_DEFAULT_APP_SECRET=${APP[2]} "$SOCKUDO" >"$log" 2>&1 &
      ;;
    *) echo "unknown server $server" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done
  sleep 1
  rss0=$(rss_kib "$SERVER_PID")
  $BIN bench --url "ws://127.0.0.1:$PORT/app/${APP[1]}" --quiet --connections "$N" --procs 1 \
    --rate 10000 --messages "$ROUNDS" --duration 120s --connect-timeout 30s --source-ips 127.0.0.2-127.0.0.20 \
    --pusher-channel feed --json "$OUT/$server-$N.json" >"$OUT/$server-$N.bench.txt" 2>&1 &
  BENCH_PID=$!
  # All in (the bench's ramp at 10,000/s, and room for the subscriptions), then memory,
  # then the rounds.
  sleep $(( N / 5000 + 8 ))
  rss1=$(rss_kib "$SERVER_PID")
  python3 bench/pusher/publish.py "127.0.0.1:$PORT" "${APP[@]}" feed "$ROUNDS" 3 >"$OUT/$server-$N.publish.txt" 2>&1 || true
  wait "$BENCH_PID" || true
  BENCH_PID=""
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
  python3 - "$OUT/$server-$N.json" "$server" "$N" "$rss0" "$rss1" <<'PY'
import json, sys
path, server = sys.argv[1], sys.argv[2]
n, rss0, rss1 = map(int, sys.argv[3:6])
try:
    s = json.load(open(path))["snapshot"]
except (OSError, ValueError):
    print(f"| {server} | no result (see bench/out/pusher-peers/{server}-{n}.*) | | | | | |")
    sys.exit(0)
setup = s["established"] / s["ramp_secs"] if s.get("ramp_secs") else 0
fanouts = [(r["last_us"] - int(stamp)) / 1e6 for stamp, r in sorted(s["rounds"].items()) if r["delivered"]]
missed = sum(r["expected"] - r["delivered_expected"] for r in s["rounds"].values() if r["complete"])
print(f"| {server} | {s['established']:,} | {sum(s['errors'].values())} | {setup:,.0f} "
      f"| {(rss1 - rss0) * 1024 / n:.0f} B | {', '.join(f'{f:.3f}' for f in fanouts)} | {missed} |")
PY
  sleep 2
done
