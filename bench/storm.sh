#!/usr/bin/env bash
# c1m against the physical limits of this machine, same client, same process counts:
# the raw-TCP baseline (connect and push, no WebSocket) and the minimal C WebSocket server
# (accept, answer the upgrade, push), both bench/peers/baseline/server.c.
#
#   bench/storm.sh [--connections N] [--runs R] [--live] [--servers LIST] [--rate R] [--client c] [--netns]
#   bench/storm.sh --restart [--max-accept-rate R] [--connections N]
#   bench/storm.sh --kill-worker [--connections N]
#   bench/storm.sh --mass-disconnect [--during-broadcast] [--connections N]
# Common: --client c1m|c (the client of the plain runs: `c1m bench`, the default, or the
# lean C client bench/peers/baseline/client.c, ~64 bytes and no allocation per
# connection, so that at a million on two cores the client's cost does not decide the
# race; it reports setup, errors by cause, rounds and missed deliveries, not latency
# histograms), --rate R (connects/s asked of the bench), --connect-timeout D (the bench's
# connect and handshake timeout, 10s by default like `c1m bench`; c1m's
# --handshake-timeout is set to the same, so neither side gives up on the other first:
# on one machine a starved bench process can take seconds between its TCP connect,
# which the kernel completes, and sending its upgrade request).
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
#   --restart: c1m only, broadcasts every 15 s once all N are connected (`--total N`:
#     on this machine a million clients cannot connect under live broadcasts, see
#     BENCHMARKS.md). Once all N clients (`c1m bench --reconnect`) are in, the whole
#     server (master and workers) is SIGKILLed and started again on the same port, gated
#     the same way so the storm is measured alone. Reports the time until all N are back
#     (`GET /stats`, polled every second), the server's peak memory, whether a worker
#     died, and the bench's errors by cause. With --max-accept-rate R the restarted
#     server admits R upgrades per second (503 + Retry-After past it).
#   --kill-worker: c1m only, gated the same way; once all N (`--reconnect`) are in, one
#     worker is SIGKILLed; reports the time until all N are back and the rounds missed
#     by the connections that stayed (a round counts as missed only for connections
#     open when it was stamped).
#   --mass-disconnect: c1m (or --servers "cws c1m"); N connections from two benches;
#     once all are up, 10,000 newcomers connect at 2,000/s from a third bench (the
#     reference, "quiet"), then one bench (N/2) is SIGKILLed, so its connections end at
#     once, and 10,000 more newcomers connect at 2,000/s ("during"); both connect-time
#     distributions (connect call to the 101) are reported. No broadcast runs during
#     either, so the disconnect is measured alone (the servers push nothing). With
#     --during-broadcast the kill comes at the instant a broadcast to all N starts
#     instead: c1m's is asked for with POST /broadcast, the C server's is due on its
#     wall-clock 15 s boundary and the kill is timed to it.
# Writes bench/out/storm/{LABEL.json, LABEL.server.log, table-*.md} and prints the table:
# setup rate, fan-out per round (stamp -> last client), missed, errors, server memory, and
# the ratios c1m / cws for setup and c1m / raw for fan-out. Run as root (it applies
# `c1m tune --apply` for N). Listens on 127.0.0.1 only; stops what it started by PID.
#
# --netns (root, Linux >= 6.1): run everything in a network namespace of its own, made
# for the run and deleted after it, whose table of established TCP connections has a
# bucket per socket (net.ipv4.tcp_child_ehash_entries = 2N rounded up to a power of
# two). The kernel sizes the host's table at boot from memory (262,144 buckets here): at
# 2N = 2,014,000 sockets every arriving segment's lookup walks a chain of ~8 sockets,
# `__inet_lookup_established` took 13 % of both cores during a broadcast (BENCHMARKS.md).
# A production host gets the same with the boot parameter thash_entries=.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
ARGS=("$@")
NETNS=0
N=190000
RUNS=1
LIVE=0
SERVERS="raw cws c1m"
RATE=200000
RESTART=0
KILL_WORKER=0
MASS=0
MASS_DURING=0
CLIENT=c1m
ACCEPT_RATE=""
CONNECT_TIMEOUT=10s
while [ $# -gt 0 ]; do
  case $1 in
    --connections) N=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --live) LIVE=1; shift ;;
    --restart) RESTART=1; shift ;;
    --kill-worker) KILL_WORKER=1; shift ;;
    --mass-disconnect) MASS=1; shift ;;
    --during-broadcast) MASS_DURING=1; shift ;;
    --client) CLIENT=$2; shift 2 ;;
    --connect-timeout) CONNECT_TIMEOUT=$2; shift 2 ;;
    --max-accept-rate) ACCEPT_RATE=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --netns) NETNS=1; shift ;;
    -h|--help) sed -n '2,61p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
source scripts/lib.sh
OUT=bench/out/storm
PEERS=bench/out/peers
mkdir -p "$OUT" "$PEERS"
cargo build --release -q
BIN=target/release/c1m
if [ $NETNS = 1 ] && [ -z "${C1M_STORM_NETNS:-}" ]; then
  [ "$(id -u)" = 0 ] || { echo "--netns needs root" >&2; exit 2; }
  CHILD_EHASH=/proc/sys/net/ipv4/tcp_child_ehash_entries
  [ -w $CHILD_EHASH ] || { echo "--netns needs Linux >= 6.1 ($CHILD_EHASH)" >&2; exit 2; }
  # The global limits (tcp_mem, file-max) are set from here; the namespace's own
  # (somaxconn, port range, ...) by the run inside it.
  $BIN tune --connections "$N" --apply >"$OUT/tune-host.txt"
  BUCKETS=1; while [ $BUCKETS -lt $(( 2 * N )) ]; do BUCKETS=$(( BUCKETS * 2 )); done
  NS=c1m-storm-$$
  OLD_EHASH=$(cat $CHILD_EHASH)
  echo $BUCKETS >$CHILD_EHASH
  ip netns add "$NS"
  echo "$OLD_EHASH" >$CHILD_EHASH
  trap 'ip netns del "$NS"' EXIT
  ip netns exec "$NS" ip link set lo up
  echo "network namespace $NS: $(ip netns exec "$NS" sysctl -n net.ipv4.tcp_ehash_entries) established-hash buckets"
  C1M_STORM_NETNS=$NS ip netns exec "$NS" bash "$SELF" "${ARGS[@]}"
  exit
fi
[ -f /usr/include/openssl/sha.h ] || { apt-get update -qq && apt-get install -y -qq libssl-dev gcc; }
gcc -O2 -Wall -o "$PEERS/baseline-server" bench/peers/baseline/server.c -lcrypto
gcc -O2 -Wall -o "$PEERS/baseline-client" bench/peers/baseline/client.c
case $CLIENT in c1m|c) ;; *) echo "--client: c1m or c" >&2; exit 2 ;; esac
case $CONNECT_TIMEOUT in *ms|*[!0-9s]*|s) echo "--connect-timeout: whole seconds, e.g. 30s" >&2; exit 2 ;; esac
if [ "$(id -u)" = 0 ]; then
  $BIN tune --connections "$N" --apply >"$OUT/tune.txt"
fi
PROCS=$(( (N + 18999) / 19000 ))
# The mass disconnect adds 10,000 newcomers: a process holds at most ~19,900 sockets.
[ $MASS = 1 ] && [ $(( N + 10000 )) -gt $(( PROCS * 19900 )) ] && PROCS=$(( PROCS + 1 ))
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
# The kernel's own account of lost packets, summed over the machine: accept-queue
# overflows, SYN and data retransmission timeouts, and packets dropped because a CPU's
# input backlog (net.core.netdev_max_backlog; loopback goes through it too) was full.
# Printed as "listen_overflows syn_retrans tcp_timeouts backlog_drops".
kernel_counters() {
  python3 - <<'PY'
lines = open("/proc/net/netstat").read().splitlines()
ext = {}
for names, values in zip(lines[::2], lines[1::2]):
    if names.startswith("TcpExt:"):
        ext = dict(zip(names.split()[1:], map(int, values.split()[1:])))
drops = sum(int(row.split()[1], 16) for row in open("/proc/net/softnet_stat"))
print(ext.get("ListenOverflows", 0), ext.get("TCPSynRetrans", 0), ext.get("TCPTimeouts", 0), drops)
PY
}
server_pids() { echo "$SERVER_PID" $(pgrep -P "$SERVER_PID" || true); }

# Live runs put every server's broadcasts on the same wall-clock grid (multiples of the
# interval since the epoch: the C server's schedule, and c1m's through --delay) and start
# the client 1 s past a grid line, so each server's rounds come at the same points of
# the ramp (14 s, 29 s, ... in) and a round is compared with a round sent to as many
# clients. (Before, c1m's first tick came when it started and the C server's at a
# random phase: their ramp rounds went to different numbers of clients.)
sleep_to_phase() { # sleep until SECONDS past the next multiple of the interval
  python3 -c 'import sys,time; i=int(sys.argv[1])/1e3; p=float(sys.argv[2]); t=time.time()
time.sleep((p - t % i) % i)' "$INTERVAL" "$1"
}
ms_to_grid() { # milliseconds until the next multiple of the interval
  python3 -c 'import sys,time; i=int(sys.argv[1]); print(i - int(time.time() * 1e3) % i)' "$INTERVAL"
}

run_one() {
  local name=$1 label=$2 port log url
  local delay=()
  port=$(free_port)
  log="$OUT/$label.server.log"
  if [ $LIVE = 1 ]; then
    sleep_to_phase 0.2
    delay=(--delay "$(ms_to_grid)ms")
  fi
  case $name in
    raw) $PEERS/baseline-server --procs "$PROCS" "${GATE[@]}" "$port" "$INTERVAL" >"$log" 2>&1 &
         url="tcp://127.0.0.1:$port" ;;
    cws) $PEERS/baseline-server --ws --procs "$PROCS" "${GATE[@]}" "$port" "$INTERVAL" >"$log" 2>&1 &
         url="ws://127.0.0.1:$port/" ;;
    cws-shared) # the same, its processes sharing one listener with EPOLLEXCLUSIVE (c1m's way)
         $PEERS/baseline-server --ws --shared --procs "$PROCS" "${GATE[@]}" "$port" "$INTERVAL" >"$log" 2>&1 &
         url="ws://127.0.0.1:$port/" ;;
    c1m) RUST_LOG=warn $BIN serve --listen "127.0.0.1:$port" --workers "$PROCS" \
           --max-connections "$N" "${GATE[@]}" "${delay[@]}" --interval "${INTERVAL}ms" \
           --ping-interval 0s --idle-timeout 0s --stats-interval 60s \
           --handshake-timeout "$CONNECT_TIMEOUT" >"$log" 2>&1 &
         url="ws://127.0.0.1:$port/" ;;
    *) echo "unknown server $name (raw, cws, c1m)" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 300); do grep -q "listening" "$log" && break; sleep 0.1; done
  sleep 0.5
  local rss0 peak=0 r
  rss0=$(rss_kib $(server_pids))
  rm -f "$OUT/$label.json" "$OUT/$label.client.json" "$OUT/$label.client.jsonl"
  [ $LIVE = 1 ] && sleep_to_phase 1.0
  local kernel0
  kernel0=$(kernel_counters)
  if [ "$CLIENT" = c ]; then
    local ws=--ws; [ "$name" = raw ] && ws=""
    $PEERS/baseline-client $ws --procs "$PROCS" --rate "$RATE" \
      --timeout-ms "$(( ${CONNECT_TIMEOUT%s} * 1000 ))" --duration-s "$LIMIT" --rounds 3 \
      --sources "127.0.0.2-$LAST_SOURCE" 127.0.0.1 "$port" "$N" \
      >"$OUT/$label.client.jsonl" 2>"$OUT/$label.bench.txt" &
  else
    $BIN bench --url "$url" --quiet --connections "$N" --procs "$PROCS" --rate "$RATE" \
      --messages 3 --source-ips "127.0.0.2-$LAST_SOURCE" --duration "${LIMIT}s" \
      --connect-timeout "$CONNECT_TIMEOUT" \
      --json "$OUT/$label.json" >"$OUT/$label.bench.txt" 2>&1 &
  fi
  local bench=$!
  while kill -0 $bench 2>/dev/null; do
    r=$(rss_kib $(server_pids)); [ "$r" -gt "$peak" ] && peak=$r
    sleep 1
  done
  wait $bench || echo "$label: the bench exited with an error (see $OUT/$label.bench.txt)" >&2
  if [ "$CLIENT" = c ]; then
    python3 bench/storm_client.py "$OUT/$label.client.jsonl" >"$OUT/$label.client.json" ||
      rm -f "$OUT/$label.client.json"
  fi
  echo "$label $rss0 $peak" >>"$OUT/memory.txt"
  echo "$label $kernel0 $(kernel_counters)" >>"$OUT/kernel.txt"
  # c1m's own account of the run (refusals, timeouts, disconnects by reason).
  [ "$name" = c1m ] && curl -s --max-time 10 "http://127.0.0.1:$port/metrics" >"$OUT/$label.metrics" || true
  stop_server
}

# The live c1m server of the --restart, --kill-worker and --mass-disconnect scenarios.
C1M_ARGS=()
start_c1m() {
  local log=$1 before; shift
  before=$(grep -c "listening" "$log" || true)
  RUST_LOG=warn $BIN serve "${C1M_ARGS[@]}" "$@" >>"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do
    [ "$(grep -c "listening" "$log" || true)" -gt "$before" ] && break
    sleep 0.1
  done
}
# Upgraded connections (c1m's /stats), or with USE_SS=1 established sockets on the port
# (for the C baseline, which has no /stats).
USE_SS=0
connected() {
  if [ "$USE_SS" = 1 ]; then
    ss -Htn state established "( sport = :$PORT )" | wc -l
  else
    curl -s --max-time 2 "http://127.0.0.1:$PORT/stats" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])' 2>/dev/null || echo 0
  fi
}
# wait_for COUNT SECONDS: polls /stats every second until COUNT connections (prints the
# seconds it took, or "not all back"); the server's peak RSS meanwhile goes to
# $OUT/peak.txt (KiB; it runs in a subshell).
wait_for() {
  local want=$1 limit=$2 t0 r n=0 peak=0
  t0=$(date +%s)
  while [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
    r=$(rss_kib $(server_pids)); [ "$r" -gt "$peak" ] && peak=$r && echo "$peak" >"$OUT/peak.txt"
    n=$(connected)
    if [ "$n" -ge "$want" ]; then
      python3 -c "import time; print(f'{time.time() - $t0:.0f} s')"; return
    fi
    sleep 1
  done
  echo "not all back ($n of $want after $limit s)"
}
# bench_in_bg LABEL COUNT RATE ARGS...: a `c1m bench` against the live server, in the
# background (its PID in BENCH_PID).
bench_in_bg() {
  local label=$1 count=$2 rate=$3; shift 3
  local procs=$(( (count + 18999) / 19000 ))
  $BIN bench --url "ws://127.0.0.1:$PORT/" --quiet --connections "$count" --procs "$procs" \
    --rate "$rate" --source-ips "127.0.0.2-$LAST_SOURCE" --connect-timeout "$CONNECT_TIMEOUT" \
    --json "$OUT/$label.json" "$@" >"$OUT/$label.bench.txt" 2>&1 &
  BENCH_PID=$!
}
stop_bench() { kill -INT "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
errors_of() {
  python3 - "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["snapshot"]
print(", ".join(f"{k} {v}" for k, v in sorted(s.get("errors", {}).items()) if v) or "none")
PY
}

# storm_one KIND LABEL: the restart or kill-worker storm (see --help).
storm_one() {
  local kind=$1 label=$2 log back died missed
  PORT=$(free_port)
  log="$OUT/$label.server.log"; : >"$log"
  C1M_ARGS=(--listen "127.0.0.1:$PORT" --workers "$PROCS" --max-connections "$N"
    --total "$N" --interval 15s --ping-interval 0s --idle-timeout 0s --stats-interval 60s
    --handshake-timeout "$CONNECT_TIMEOUT")
  start_c1m "$log"
  bench_in_bg "$label" "$N" "$RATE" --reconnect --duration "$((LIMIT * 3 + 120))s"
  echo "$label: $(wait_for "$N" "$LIMIT") to connect all $N" >&2
  echo 0 >"$OUT/peak.txt"
  if [ "$kind" = restart ]; then
    local old
    old=$(server_pids)
    kill -9 $old 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    # The workers hold the listening socket until the kernel has torn them down.
    for pid in $old; do
      for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    done
    start_c1m "$log" ${ACCEPT_RATE:+--max-accept-rate "$ACCEPT_RATE"}
    sleep 1
  else
    kill -9 "$(pgrep -P "$SERVER_PID" | head -1)"
    sleep 1
  fi
  back=$(wait_for "$N" "$((LIMIT * 2))")
  # Workers that exited since (the master logs each): none expected but the one killed.
  died=$(grep -c "worker exited" "$log" || true)
  [ "$kind" = kill-worker ] && died=$((died - 1))
  sleep 20 # at least one round with everyone back
  stop_bench "$BENCH_PID"
  stop_server
  missed=$($BIN report summary "$OUT/$label.json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["missed"])')
  echo "| $label | $N | $back | $(( $(cat "$OUT/peak.txt") / 1024 )) MiB | $died | $missed | $(errors_of "$OUT/$label.json") |" >>"$OUT/table-$kind-$N.md"
}

# mass_one SERVER LABEL: the mass disconnect (see --help), against c1m or cws.
mass_one() {
  local server=$1 label=$2 log half=$((N / 2)) bench_a bench_b interval=86400000 now_ms
  PORT=$(free_port)
  log="$OUT/$label.server.log"; : >"$log"
  USE_SS=0
  [ $MASS_DURING = 1 ] && interval=15000
  if [ "$server" = cws ]; then
    USE_SS=1
    # Pushes on wall-clock multiples of the interval: once a day at 00:00 UTC (none during a run),
    # or with --during-broadcast every 15 s, the kill timed to one of them.
    $PEERS/baseline-server --ws --procs "$PROCS" --total "$N" "$PORT" "$interval" >"$log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 300); do grep -q "listening" "$log" && break; sleep 0.1; done
  else
    # No clock: the one broadcast of --during-broadcast is asked for with POST /broadcast.
    C1M_ARGS=(--listen "127.0.0.1:$PORT" --workers "$PROCS" --max-connections "$((N + 20000))"
      --connect-only --api-key storm --ping-interval 0s --idle-timeout 0s --stats-interval 60s
      --handshake-timeout "$CONNECT_TIMEOUT")
    start_c1m "$log"
  fi
  bench_in_bg "$label-stay" "$((N - half))" "$RATE" --duration "$((LIMIT * 3 + 120))s"; bench_a=$BENCH_PID
  bench_in_bg "$label-leave" "$half" "$RATE" --duration "$((LIMIT * 3 + 120))s"; bench_b=$BENCH_PID
  echo "$label: $(wait_for "$N" "$LIMIT") to connect all $N" >&2
  # Newcomers on a quiet server first (the reference), then during the mass disconnect.
  # --messages 0: each is done once upgraded; the bench ends when all are.
  bench_in_bg "$label-newcomers-quiet" 10000 2000 --messages 0 --duration 60s
  wait "$BENCH_PID" || true
  sleep 5
  if [ $MASS_DURING = 1 ]; then
    if [ "$server" = cws ]; then
      # Sleep until its next 15 s wall-clock boundary (at least 1 s away).
      now_ms=$(date +%s%3N)
      python3 -c "import time; t=$now_ms/1000; n=(int(t/15)+1)*15; n+=15 if n-t<1 else 0; time.sleep(max(0, n-time.time()))"
    else
      curl -s --max-time 5 -H "Authorization: Bearer storm" --data "$(date +%s%3N)" \
        "http://127.0.0.1:$PORT/broadcast" >/dev/null &
    fi
  fi
  kill -9 "$bench_b" $(pgrep -P "$bench_b") 2>/dev/null || true
  bench_in_bg "$label-newcomers-during" 10000 2000 --messages 0 --duration 60s
  wait "$BENCH_PID" || true
  wait "$bench_b" 2>/dev/null || true
  stop_bench "$bench_a"
  stop_server
  for part in quiet during; do
    $BIN report summary "$OUT/$label-newcomers-$part.json" | python3 -c "
import json, sys
s = json.load(sys.stdin)
print(f\"| $label | newcomers, $part | {s['established']:,} | {s['errors']} | {s['connect_p50_ms']:.1f} / {s['connect_p99_ms']:.1f} / {s['connect_max_ms']:.1f} ms |\")" >>"$OUT/table-mass$MASS_SUFFIX-$N.md"
  done
}

MASS_SUFFIX=""; [ $MASS_DURING = 1 ] && MASS_SUFFIX=-broadcast
scenario() {
  local kind=$1 header=$2 label
  local table="$OUT/table-$kind$MASS_SUFFIX-$N.md"
  [ -f "$table" ] || printf '%s\n' "$header" >"$table"
  for run in $(seq "$RUNS"); do
    label="$kind-$N${ACCEPT_RATE:+-rate$ACCEPT_RATE}${MASS_SUFFIX}-run$run"
    echo "== $label" >&2
    case $kind in
      restart|kill-worker) storm_one "$kind" "$label" ;;
      mass) for server in $SERVERS; do mass_one "$server" "$label-$server"; done ;;
    esac
  done
  cat "$table"
  exit 0
}
STORM_HEADER="| run | clients | all back after | server RSS peak after | other workers that died | missed | bench errors by cause |
|---|---:|---:|---:|---|---:|---|"
[ $RESTART = 1 ] && scenario restart "$STORM_HEADER"
[ $KILL_WORKER = 1 ] && scenario kill-worker "$STORM_HEADER"
[ $MASS = 1 ] && [ "$SERVERS" = "raw cws c1m" ] && SERVERS=c1m
[ $MASS = 1 ] && scenario mass "| run | who | connected | errors | connect time p50 / p99 / max |
|---|---|---:|---:|---:|"

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
