#!/usr/bin/env bash
# c1m against the physical limits of this machine, same client, same process counts:
# the raw-TCP baseline (connect and push, no WebSocket) and the minimal C WebSocket server
# (accept, answer the upgrade, push), both bench/peers/baseline/server.c.
#
#   bench/storm.sh [--connections N] [--runs R] [--live] [--servers LIST] [--rate R]
#   bench/storm.sh --restart [--max-accept-rate R] [--connections N]
#
# Defaults: 190000 connections, 1 run, servers "raw cws c1m" (also: cws-shared; interleaved, run by run, so
# drift hits them alike), a connect rate of 200,000/s (more than any of them takes: the
# setup rate is the server's). Every server runs ceil(N / 19,000) processes (this
# machine's nofile cap is 20,000) and `c1m bench` as many, from ~5,000 connections per
# source address. Each run ends after 3 broadcasts received by every connection.
#   gated (default): the seed's conditions, no broadcast until all N are connected
#     (`--total N`), a broadcast every max(2 s, 25 us x N);
#   --live: a broadcast every 15 s from the first second, so clients arrive while the
#     server fans out (issue 15's storm).
#   --restart: c1m only, a broadcast every 15 s; once all N clients (`c1m bench
#     --reconnect`) are connected the whole server (master and workers) is SIGKILLed and
#     started again on the same port; reports the time until all N are back (from
#     `GET /stats`, polled every second), the server's peak memory and whether a worker
#     died, then the bench's errors by cause. With --max-accept-rate the restarted server
#     admits that many upgrades per second (503 + Retry-After past it).
# Writes bench/out/storm/{LABEL.json, LABEL.server.log, table-*.md} and prints the table:
# setup rate, fan-out per round (stamp -> last client), missed, errors, server memory, and
# the ratios c1m / cws for setup and c1m / raw for fan-out. Run as root (it applies
# `c1m tune --apply` for N). Listens on 127.0.0.1 only; stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
N=190000
RUNS=1
LIVE=0
SERVERS="raw cws c1m"
RATE=200000
RESTART=0
ACCEPT_RATE=""
while [ $# -gt 0 ]; do
  case $1 in
    --connections) N=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --live) LIVE=1; shift ;;
    --restart) RESTART=1; shift ;;
    --max-accept-rate) ACCEPT_RATE=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
source scripts/lib.sh
OUT=bench/out/storm
PEERS=bench/out/peers
mkdir -p "$OUT" "$PEERS"
cargo build --release -q
BIN=target/release/c1m
[ -f /usr/include/openssl/sha.h ] || { apt-get update -qq && apt-get install -y -qq libssl-dev gcc; }
gcc -O2 -Wall -o "$PEERS/baseline-server" bench/peers/baseline/server.c -lcrypto
if [ "$(id -u)" = 0 ]; then
  $BIN tune --connections "$N" --apply >"$OUT/tune.txt"
fi
PROCS=$(( (N + 18999) / 19000 ))
SOURCES=$(( N / 5000 )); [ $SOURCES -lt 16 ] && SOURCES=16
LAST_SOURCE=127.0.$(( (SOURCES + 1) / 256 )).$(( (SOURCES + 1) % 256 ))
if [ $LIVE = 1 ]; then
  MODE=live; INTERVAL=15000; GATE=()
else
  MODE=gated; INTERVAL=$(( N * 25 / 1000 )); [ $INTERVAL -lt 2000 ] && INTERVAL=2000
  GATE=(--total "$N")
fi
# Bounded: a ramp at a tenth of the asked rate, five intervals, and slack.
LIMIT=$(( N * 10 / RATE + INTERVAL * 5 / 1000 + 60 ))

SERVER_PID=""
stop_server() {
  [ -z "$SERVER_PID" ] && return
  kill "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
trap stop_server EXIT
server_pids() { echo "$SERVER_PID" $(pgrep -P "$SERVER_PID" || true); }

run_one() {
  local name=$1 label=$2 port log url
  port=$(free_port)
  log="$OUT/$label.server.log"
  case $name in
    raw) $PEERS/baseline-server --procs "$PROCS" "${GATE[@]}" "$port" "$INTERVAL" >"$log" 2>&1 &
         url="tcp://127.0.0.1:$port" ;;
    cws) $PEERS/baseline-server --ws --procs "$PROCS" "${GATE[@]}" "$port" "$INTERVAL" >"$log" 2>&1 &
         url="ws://127.0.0.1:$port/" ;;
    cws-shared) # the same, its processes sharing one listener with EPOLLEXCLUSIVE (c1m's way)
         $PEERS/baseline-server --ws --shared --procs "$PROCS" "${GATE[@]}" "$port" "$INTERVAL" >"$log" 2>&1 &
         url="ws://127.0.0.1:$port/" ;;
    c1m) RUST_LOG=warn $BIN serve --listen "127.0.0.1:$port" --workers "$PROCS" \
           --max-connections "$N" "${GATE[@]}" --interval "${INTERVAL}ms" \
           --ping-interval 0s --idle-timeout 0s --stats-interval 60s >"$log" 2>&1 &
         url="ws://127.0.0.1:$port/" ;;
    *) echo "unknown server $name (raw, cws, c1m)" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 300); do grep -q "listening" "$log" && break; sleep 0.1; done
  sleep 0.5
  local rss0 peak=0 r
  rss0=$(rss_kib $(server_pids))
  $BIN bench --url "$url" --quiet --connections "$N" --procs "$PROCS" --rate "$RATE" \
    --messages 3 --source-ips "127.0.0.2-$LAST_SOURCE" --duration "${LIMIT}s" \
    --json "$OUT/$label.json" >"$OUT/$label.bench.txt" 2>&1 &
  local bench=$!
  while kill -0 $bench 2>/dev/null; do
    r=$(rss_kib $(server_pids)); [ "$r" -gt "$peak" ] && peak=$r
    sleep 1
  done
  wait $bench || echo "$label: the bench exited with an error (see $OUT/$label.bench.txt)" >&2
  echo "$label $rss0 $peak" >>"$OUT/memory.txt"
  stop_server
}

# restart_one LABEL: the restart storm (see --help).
restart_one() {
  local label=$1 port log url bench_pid t0 back=0 peak=0 r n
  port=$(free_port)
  log="$OUT/$label.server.log"
  local limits=(--listen "127.0.0.1:$port" --workers "$PROCS" --max-connections "$N"
    --interval 15s --ping-interval 0s --idle-timeout 0s --stats-interval 60s)
  RUST_LOG=warn $BIN serve "${limits[@]}" >"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do grep -q "listening" "$log" && break; sleep 0.1; done
  url="ws://127.0.0.1:$port/"
  $BIN bench --url "$url" --quiet --connections "$N" --procs "$PROCS" --rate "$RATE" \
    --reconnect --source-ips "127.0.0.2-$LAST_SOURCE" --duration "$((LIMIT + 120))s" \
    --json "$OUT/$label.json" >"$OUT/$label.bench.txt" 2>&1 &
  bench_pid=$!
  connected() { curl -s --max-time 2 "http://127.0.0.1:$port/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])' 2>/dev/null || echo 0; }
  for _ in $(seq "$LIMIT"); do n=$(connected); [ "$n" -ge "$N" ] && break; sleep 1; done
  echo "$label: $n connected before the kill" >&2
  local pids
  pids=$(server_pids)
  kill -9 $pids 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  t0=$(date +%s.%N)
  RUST_LOG=warn $BIN serve "${limits[@]}" ${ACCEPT_RATE:+--max-accept-rate "$ACCEPT_RATE"} >>"$log" 2>&1 &
  SERVER_PID=$!
  local workers_at_start=""
  for _ in $(seq $((LIMIT + 100))); do
    r=$(rss_kib $(server_pids)); [ "$r" -gt "$peak" ] && peak=$r
    [ -z "$workers_at_start" ] && workers_at_start=$(pgrep -P "$SERVER_PID" | sort | tr '\n' ' ')
    n=$(connected)
    if [ "$n" -ge "$N" ]; then back=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')"); break; fi
    sleep 1
  done
  local workers_now
  workers_now=$(pgrep -P "$SERVER_PID" | sort | tr '\n' ' ')
  local died=no; [ "$workers_at_start" != "$workers_now" ] && died=yes
  kill -INT $bench_pid 2>/dev/null || true
  wait $bench_pid 2>/dev/null || true
  stop_server
  echo "| $label | $N | ${back:-not all back} s | $((peak / 1024)) MiB | $died | $(python3 - "$OUT/$label.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["snapshot"]
errors = s.get("errors", {})
print(", ".join(f"{k} {v}" for k, v in sorted(errors.items()) if v) or "none")
PY
) |" >>"$OUT/table-restart-$N.md"
}

if [ $RESTART = 1 ]; then
  [ -f "$OUT/table-restart-$N.md" ] || {
    echo "| run | clients | all back after restart | server RSS peak after restart | worker died | bench errors by cause |"
    echo "|---|---:|---:|---:|---|---|"; } >"$OUT/table-restart-$N.md"
  for run in $(seq "$RUNS"); do
    label="restart-$N-rate${ACCEPT_RATE:-none}-run$run"
    echo "== $label" >&2
    restart_one "$label"
  done
  cat "$OUT/table-restart-$N.md"
  exit 0
fi

labels=()
for run in $(seq "$RUNS"); do
  for name in $SERVERS; do
    label="$MODE-$N-$name-run$run"
    echo "== $label" >&2
    run_one "$name" "$label"
    labels+=("$label")
  done
done
python3 bench/storm_table.py "$OUT" "$MODE" "$N" "${labels[@]}" >"$OUT/table-$MODE-$N.md"
cat "$OUT/table-$MODE-$N.md"
