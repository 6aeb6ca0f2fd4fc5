#!/usr/bin/env bash
# What wss:// costs against ws:// (issue 18), in the same run, for each N given
# (default 10000 190000): `c1m serve --workers ceil(N/19000) --total N --interval 4s`
# (30s past 200,000)
# and `c1m bench -c N --messages 3` (one bench process per 19,000), once plain and once
# over TLS (a throwaway P-256 certificate; the bench checks it with --ca-cert; full
# handshakes, at most TLS_RATE a second past 19,000 clients: see below). Reports
# the server's memory per connection (the largest RSS of master and workers while the
# bench ran, minus before it, over N: transient buffers count against us), the bench's
# memory per connection, the setup rate (full handshakes), the fan-out of the three
# broadcasts (stamp to the last client), and what was missed.
#
# Then, for TLS only, reconnects: N clients that each close after ~1 s (±50 %) and come
# back at once, for 30 s, with and without session resumption (`--no-tls-resume`):
# handshakes per second and the server's CPU per handshake.
#
#   bench/tls.sh [N...]
#   KINDS=tls RECONNECTS=0 bench/tls.sh 1007000      (TLS alone, no reconnect runs)
#   KINDS=none SERVE_ARGS="--max-tls-handshakes 4096" bench/tls.sh 10000
#                                                    (reconnects only, extra serve flags)
# Run as root (it applies `c1m tune --apply`). Listens on 127.0.0.1 only; stops what it
# started by PID. Writes bench/out/tls/.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("${@:-10000 190000}")
read -r -a SIZES <<<"${SIZES[*]}"
for n in "${SIZES[@]}"; do
  [[ $n =~ ^[0-9]+$ ]] || { sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
done
source scripts/lib.sh
cargo build --release -q
BIN=target/release/c1m
OUT=bench/out/tls
mkdir -p "$OUT"
MAX=$(printf '%s\n' "${SIZES[@]}" | sort -n | tail -1)
$BIN tune --apply --connections "$MAX" >"$OUT/tune.txt" 2>&1 || true
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
  -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null
stop_started_on_exit
tree() { echo "$1" $(pgrep -P "$1" || true); }

# run KIND N [BENCH ARGS...]: one server and one bench; prints a JSON line of figures.
run() {
  local kind=$1 n=$2; shift 2
  local procs=$(( (n + 18999) / 19000 ))
  # ~5,000 connections per source address (at least 16): a fuller address makes
  # connect() crawl in the kernel's port search (see `c1m tune`).
  local sources=$(( n / 5000 )); [ "$sources" -lt 16 ] && sources=16
  local last_source=127.0.$(( (sources + 1) / 256 )).$(( (sources + 1) % 256 ))
  local scheme=ws tls_serve=() tls_bench=()
  if [ "$kind" != plain ]; then
    scheme=wss
    tls_serve=(--tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem")
    tls_bench=(--ca-cert "$OUT/cert.pem")
  fi
  PORT=$(free_port)
  local log="$OUT/$kind-$n.server.log"
  # The clock must outlast a fan-out, or a busy worker coalesces ticks (it sends only
  # the newest) and the bench counts the skipped one as missed: ~20 s over TLS at 1M.
  local interval=4s
  [ "$n" -gt 200000 ] && interval=30s
  $BIN serve --listen "127.0.0.1:$PORT" --workers "$procs" --total "$n" --interval "$interval" \
    --ping-interval 0s --idle-timeout 0s \
    --stats-interval 60s "${tls_serve[@]}" ${SERVE_ARGS:-} >"$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do grep -q listening "$log" && break; sleep 0.1; done
  sleep 1
  local rss0 cpu0 smax=0 bmax=0 s b
  rss0=$(rss_kib $(tree "$SERVER_PID"))
  cpu0=$(cpu_secs $(tree "$SERVER_PID"))
  $BIN bench --url "$scheme://localhost:$PORT/" --quiet --connections "$n" --procs "$procs" \
    --source-ips "127.0.0.2-$last_source" --connect-timeout 60s "${tls_bench[@]}" "$@" \
    --json "$OUT/$kind-$n.json" >"$OUT/$kind-$n.bench.txt" 2>&1 &
  BENCH_PID=$!
  while kill -0 "$BENCH_PID" 2>/dev/null; do
    s=$(rss_kib $(tree "$SERVER_PID")); b=$(rss_kib $(tree "$BENCH_PID"))
    [ "$s" -gt "$smax" ] && smax=$s
    [ "$b" -gt "$bmax" ] && bmax=$b
    sleep 0.5
  done
  wait "$BENCH_PID" 2>/dev/null || true
  BENCH_PID=""
  local cpu1
  cpu1=$(cpu_secs $(tree "$SERVER_PID"))
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
  python3 - "$OUT/$kind-$n.json" "$kind" "$n" "$rss0" "$smax" "$bmax" "$cpu0" "$cpu1" <<'PY'
import json, sys
path, kind = sys.argv[1], sys.argv[2]
n, rss0, smax, bmax = map(int, sys.argv[3:7])
cpu = float(sys.argv[8]) - float(sys.argv[7])
s = json.load(open(path))["snapshot"]
rounds = [(int(k), v) for k, v in s["rounds"].items() if v["complete"]]
fan = [(v["last_us"] - k) / 1000 for k, v in sorted(rounds)]
print(json.dumps({
    "kind": kind, "n": n, "established": s["established"],
    "errors": sum(s["errors"].values()), "missed": sum(max(0, v["expected"] - v["delivered_expected"]) for _, v in rounds),
    "setup": s["established"] / s["ramp_secs"] if s.get("ramp_secs") else 0,
    "server_b": (smax - rss0) * 1024 / n, "bench_b": bmax * 1024 / n,
    "fanout_ms": fan[:3], "handshakes": s.get("tls_handshakes", 0), "resumed": s.get("tls_resumed", 0),
    "elapsed": s["elapsed_secs"], "server_cpu": cpu,
}))
PY
  sleep 3
}

RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
for n in "${SIZES[@]}"; do
  # Full handshakes only (a ticket from an earlier connection of the same bench process
  # would make most of them resumptions). The server does ~3,000 full handshakes a
  # second on this machine's two cores (shared with the bench's own): past one worker,
  # the bench opens TLS connections at TLS_RATE (default 2,500/s), below that, since a
  # queue of handshakes longer than the handshake timeout turns into failures.
  tls_rate=20000
  [ "$n" -gt 19000 ] && tls_rate=${TLS_RATE:-2500}
  for kind in ${KINDS:-plain tls}; do
    echo "== $kind $n" >&2
    case $kind in
      # --reconnect: a connection that fails (a handshake queued past the server's
      # timeout near a million) comes back, as a real client would; errors still count.
      plain) run plain "$n" --rate 20000 --messages 3 --duration 1800s --reconnect >>"$RESULTS" ;;
      tls) run tls "$n" --rate "$tls_rate" --messages 3 --duration 1800s --no-tls-resume --reconnect >>"$RESULTS" ;;
    esac
  done
done
n=${SIZES[0]}
[ "${RECONNECTS:-1}" = 1 ] && reconnect_kinds="tls-resumed tls-full" || reconnect_kinds=""
for kind in $reconnect_kinds; do
  echo "== reconnects ($kind) $n" >&2
  extra=()
  [ "$kind" = tls-full ] && extra=(--no-tls-resume)
  run "$kind" "$n" --rate 20000 --lifetime 1s --reconnect --duration 30s "${extra[@]}" >>"$RESULTS"
done
python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| run | established | errors | missed | setup /s | server memory / conn | bench memory / conn | fan-out (ms) |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    if r["kind"] in ("plain", "tls"):
        fan = ", ".join(f"{f:.0f}" for f in r["fanout_ms"])
        print(f"| {r['kind']} {r['n']:,} | {r['established']:,} | {r['errors']} | {r['missed']} | {r['setup']:,.0f} "
              f"| {r['server_b']:,.0f} B | {r['bench_b']:,.0f} B | {fan} |")
print()
print("| reconnects (30 s, each client ~1 s per connection) | TLS handshakes | resumed | handshakes /s | server CPU per handshake |")
print("|---|---:|---:|---:|---:|")
for r in rows:
    if r["kind"].startswith("tls-"):
        hs = r["handshakes"]
        print(f"| {r['kind']} {r['n']:,} | {hs:,} | {r['resumed']:,} | {hs / r['elapsed']:,.0f} "
              f"| {r['server_cpu'] / max(hs, 1) * 1e6:,.0f} µs |")
PY
