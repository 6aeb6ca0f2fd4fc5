#!/usr/bin/env bash
# What positions and recovery cost (issue 16's benchmarks), with `c1m bench`:
#
# 1. positions: N clients (default 190,000) on `c1m serve --workers ceil(N/19000)`, the
#    clock gated on all N (`--total N`), 3 rounds at `--interval`; three runs, one after
#    the other: "bare" (no history, seed-style clients), "envelopes" (the clock's topic
#    keeps history, `--history-for time=100`, and clients ask for envelopes,
#    `?envelope=1`) and "positions" (the same, and every client keeps its position and
#    checks every offset: `c1m bench --reconnect --recover`, which costs the client more
#    CPU). Reports the server's memory per connection (RSS with all N connected minus
#    RSS before any, over N), the server's own fan-out time of each round (the slowest
#    worker's first to last write, from its debug log) and the client's (stamp to the
#    last client).
# 2. storm: S clients (default 100,000) on the topic `feed` (`--history-for feed=100`),
#    each with a position (one publication first); then the bench processes are frozen
#    (SIGSTOP), every worker is SIGKILLed at once, 10 publications go out through the
#    replacement workers (the master keeps the history), and the bench is let go
#    (SIGCONT): all S clients find their connection gone at once, come back with
#    `--reconnect --recover` (0.05-0.1 s first backoff), resume from their position and
#    get the 10 they missed. Reports the time from the SIGCONT until all S are connected
#    again, the server's CPU seconds meanwhile, and the bench's recovery counts
#    (resumes, `recovered: true`, publications replayed per resume, missed).
#
#    With --kinds "bare pusher" (any of bare, envelopes, positions, pusher), the runs
#    are those, in that order; "pusher" is the Pusher protocol on the same clock
#    (`--pusher-app`, clients on /app/KEY with `c1m bench --pusher-channel time`), to
#    compare a Pusher connection's costs with a native one's (issue 17).
#
#   bench/recovery.sh [--connections N] [--storm S] [--only positions|storm] [--kinds LIST]
# Run as root (it applies `c1m tune --apply`). Listens on 127.0.0.1 only; stops what it
# started by PID. Writes bench/out/recovery/.
set -euo pipefail
cd "$(dirname "$0")/.."
N=190000
S=100000
ONLY=""
KINDS="bare envelopes positions"
INTERVAL=5s
while [ $# -gt 0 ]; do
  case $1 in
    --connections) N=$2; shift 2 ;;
    --storm) S=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --kinds) KINDS=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
source scripts/lib.sh
cargo build --release -q
BIN=target/release/c1m
OUT=bench/out/recovery
mkdir -p "$OUT"
$BIN tune --apply --connections $(( N > S ? N : S )) >"$OUT/tune.txt" 2>&1 || true
stop_started_on_exit
server_pids() { echo "$SERVER_PID" $(pgrep -P "$SERVER_PID" || true); }
procs_for() { echo $(( ($1 + 18999) / 19000 )); }

# start_server LOG ARGS...: c1m serve on a free port (PORT), waits for it to listen.
start_server() {
  local log=$1; shift
  PORT=$(free_port)
  # The delivery debug lines give each worker's own fan-out time of each round.
  RUST_LOG=warn,c1m_server::server::delivery=debug $BIN serve --listen "127.0.0.1:$PORT" --ping-interval 0s --idle-timeout 0s \
    --stats-interval 60s "$@" >"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do grep -q listening "$log" && break; sleep 0.1; done
  sleep 0.5
}
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; }
connected() {
  curl -s --max-time 2 "http://127.0.0.1:$PORT/stats" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])' 2>/dev/null || echo 0
}

positions_run() {
  local kind=$1 procs rss0 rss1 extra_server=() extra_bench=() path=/
  procs=$(procs_for "$N")
  case $kind in
    envelopes) extra_server=(--history-for time=100); path="/?envelope=1" ;;
    positions) extra_server=(--history-for time=100); extra_bench=(--reconnect --recover) ;;
    pusher) extra_server=(--pusher-app 1:bench-key:bench-secret); path=/app/bench-key
            extra_bench=(--pusher-channel time) ;;
  esac
  start_server "$OUT/$kind-$N.server.log" --workers "$procs" --total "$N" --delay 0 \
    --interval "$INTERVAL" "${extra_server[@]}"
  rss0=$(rss_kib $(server_pids))
  $BIN bench --url "ws://127.0.0.1:$PORT$path" --quiet --connections "$N" --procs "$procs" \
    --rate 20000 --messages 3 --source-ips 127.0.0.2-127.0.0.60 --duration 300s \
    --connect-timeout 30s "${extra_bench[@]}" --json "$OUT/$kind-$N.json" \
    >"$OUT/$kind-$N.bench.txt" 2>&1 &
  BENCH_PID=$!
  # Memory once all N are in, before the first round's buffers come and go.
  for _ in $(seq 600); do [ "$(connected)" -ge "$N" ] && break; sleep 0.5; done
  rss1=$(rss_kib $(server_pids))
  wait "$BENCH_PID" || true
  BENCH_PID=""
  stop_server
  python3 - "$OUT/$kind-$N.json" "$kind" "$N" "$rss0" "$rss1" "$OUT/$kind-$N.server.log" <<'PY'
import datetime, json, re, sys
path, kind, n, rss0, rss1, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
s = json.load(open(path))["snapshot"]
fanouts = [(r["last_us"] - int(stamp)) / 1e6 for stamp, r in sorted(s["rounds"].items()) if r["delivered"]]
# The server's own: per round (lines more than a second apart start a new one), the
# slowest worker's first-to-last write.
rounds, last = [], None
for line in open(log):
    m = re.match(r"(\S+)Z .*fan-out done sent=(\d+) fanout_ms=([\d.]+)", line)
    if not m or int(m.group(2)) == 0:
        continue
    at = datetime.datetime.fromisoformat(m.group(1))
    if last is None or (at - last).total_seconds() > 1:
        rounds.append(0.0)
    rounds[-1] = max(rounds[-1], float(m.group(3)) / 1000)
    last = at
# A last tick may go out while the clients leave (the bench stops after 3): not a round.
rounds = rounds[:len(fanouts)]
rec = s.get("recovery", {})
setup = s["established"] / s["ramp_secs"] if s.get("ramp_secs") else 0
print(f"| {kind} | {s['established']:,} | {sum(s['errors'].values())} | {setup:,.0f} | {(rss1 - rss0) * 1024 / n:.0f} B "
      f"| {', '.join(f'{f:.2f}' for f in rounds)} | {', '.join(f'{f:.2f}' for f in fanouts)} "
      f"| {sum(r['expected'] - r['delivered_expected'] for r in s['rounds'].values() if r['complete'])} "
      f"| {rec.get('missed', 0) if kind == 'positions' else '–'} |")
PY
}

storm_run() {
  local procs t0 back cpu0 cpu1 pids
  procs=$(procs_for "$S")
  # Workers to kill (with one, `--workers 1` is a single process).
  [ "$procs" -lt 2 ] && procs=2
  start_server "$OUT/storm-$S.server.log" --workers "$procs" --connect-only --api-key k \
    --history-for feed=100
  $BIN bench --url "ws://127.0.0.1:$PORT/?topic=feed" --quiet --connections "$S" \
    --procs "$procs" --rate 20000 --source-ips 127.0.0.2-127.0.0.60 --duration 240s \
    --connect-timeout 30s --reconnect --recover --json "$OUT/storm-$S.json" \
    >"$OUT/storm-$S.bench.txt" 2>&1 &
  BENCH_PID=$!
  for _ in $(seq 600); do [ "$(connected)" -ge "$S" ] && break; sleep 0.5; done
  publish() {
    curl -s --max-time 5 -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer k' \
      -H 'Content-Type: application/json' -d "{\"topic\":\"feed\",\"message\":$1}" \
      "http://127.0.0.1:$PORT/publish" || true
  }
  # Every client gets a position.
  [ "$(publish "$(date +%s%3N)")" = 200 ] || echo "the first publish failed" >&2
  sleep 3
  pids=$(pgrep -P "$SERVER_PID" | tr '\n' ' ' || true)
  # The clients are frozen first (SIGSTOP), so that none is back before all ten
  # publications went out: each then has exactly ten to recover.
  local clients
  clients="$BENCH_PID $(pgrep -P "$BENCH_PID" | tr '\n' ' ' || true)"
  # shellcheck disable=SC2086
  kill -STOP $clients
  # shellcheck disable=SC2086
  kill -9 $pids
  # Ten publications at once (ten threads, each retrying until a replacement worker
  # takes it), so that most clients, back after their 0.05-0.1 s first backoff, have
  # missed all ten.
  local sent
  sent=$(python3 - "$PORT" <<'PY'
import http.client, json, sys, threading, time
port = int(sys.argv[1])
done = []
def one():
    for _ in range(500):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            body = json.dumps({"topic": "feed", "message": int(time.time() * 1000)})
            c.request("POST", "/publish", body, {"Authorization": "Bearer k", "Content-Type": "application/json"})
            if c.getresponse().status == 200:
                done.append(1)
                return
        except OSError:
            pass
        time.sleep(0.005)
threads = [threading.Thread(target=one) for _ in range(10)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(done))
PY
)
  # The master's CPU so far; the replacement workers' is all in the storm but for their
  # start and the ten publications.
  cpu0=$(cpu_secs $(server_pids))
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  kill -CONT $clients
  back="not all back"
  for _ in $(seq 1200); do
    if [ "$(connected)" -ge "$S" ]; then
      back=$(python3 -c "import time; print(f'{time.time() - $t0:.1f} s')")
      break
    fi
    sleep 0.1
  done
  cpu1=$(cpu_secs $(server_pids))
  sleep 5 # the last recoveries' publications on their way
  kill -INT "$BENCH_PID" 2>/dev/null || true
  wait "$BENCH_PID" || true
  BENCH_PID=""
  stop_server
  python3 - "$OUT/storm-$S.json" "$S" "$back" "$cpu0" "$cpu1" "$sent" <<'PY'
import json, sys
path, s_n, back, cpu0, cpu1, sent = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
s = json.load(open(path))["snapshot"]
r = s.get("recovery", {})
nr = ", ".join(f"{k} {v}" for k, v in sorted(r.get("not_recovered", {}).items())) or "none"
print(f"| {s_n:,} | {sent} | {back} | {cpu1 - cpu0:.1f} s | {s['active']:,} "
      f"| {r.get('resumes', 0):,} | {r.get('recovered', 0):,} | {nr} | {r.get('replayed', 0):,} ({r.get('replayed', 0) / max(r.get('resumes', 0), 1):.1f}) "
      f"| {r.get('missed', 0)} | {r.get('duplicates', 0)} |")
PY
}

if [ "$ONLY" != storm ]; then
  echo "| clients | established | errors | setup /s | server memory / connection | server fan-out per round, slowest worker (s) | stamp to last client per round (s) | missed rounds | missed (offsets) |" >"$OUT/table-positions-$N.md"
  echo "|---|---:|---:|---:|---:|---|---|---:|---:|" >>"$OUT/table-positions-$N.md"
  for kind in $KINDS; do
    positions_run "$kind" >>"$OUT/table-positions-$N.md"
  done
  sed -i "1s/| clients |/| run ($N clients) |/" "$OUT/table-positions-$N.md"
  cat "$OUT/table-positions-$N.md"
fi
if [ "$ONLY" != positions ]; then
  {
    echo "| clients | publications while away | all back after | server CPU meanwhile | open at end | resumes | recovered | not recovered | replayed (per resume) | missed | duplicates |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    storm_run
  } >"$OUT/table-storm-$S.md"
  cat "$OUT/table-storm-$S.md"
fi
