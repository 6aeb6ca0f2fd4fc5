#!/usr/bin/env bash
# Server memory per idle connection, setup rate and fan-out time for one `c1m serve`
# process and one `c1m bench` process on loopback.
#
#   scripts/bench-single.sh [CONNECTIONS] [RATE]      (defaults: 10000, 20000/s)
#   TLS=1 scripts/bench-single.sh ...                  (wss:// with a throwaway self-signed
#                                                       certificate made by openssl)
#
# Memory per connection = (server RSS with N connections − RSS with 0) / N, sampled
# every 100 ms while the bench holds the connections (the max is kept, so transient
# fan-out buffers count against us). The server gates its first broadcast on all N
# being connected, then broadcasts every 2 s; the bench stops after 3 messages each.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
RATE=${2:-20000}
PORT=${PORT:-18088}
cargo build --release -q
BIN=target/release/c1m
OUT=$(mktemp -d)
source scripts/lib.sh

SCHEME=ws; TLS_SERVE=(); TLS_BENCH=()
if [ "${TLS:-0}" = 1 ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null
  SCHEME=wss; TLS_SERVE=(--tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem"); TLS_BENCH=(--ca-cert "$OUT/cert.pem")
fi
$BIN serve --workers 1 --listen 127.0.0.1:$PORT --total "$N" --interval 2s --stats-interval 1s "${TLS_SERVE[@]}" >"$OUT/serve.out" 2>"$OUT/serve.err" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
sleep 1
BASE=$(rss_kib $SERVER)

$BIN bench --url $SCHEME://localhost:$PORT/ -c "$N" --rate "$RATE" --messages 3 "${TLS_BENCH[@]}" \
  --source-ips 127.0.0.2-127.0.0.20 --quiet --json "$OUT/bench.json" >"$OUT/bench.txt" &
BENCH=$!
SERVER_MAX=0; BENCH_MAX=0
while kill -0 $BENCH 2>/dev/null; do
  s=$(rss_kib $SERVER); b=$(rss_kib $BENCH)
  [ "${s:-0}" -gt "$SERVER_MAX" ] && SERVER_MAX=$s
  [ "${b:-0}" -gt "$BENCH_MAX" ] && BENCH_MAX=$b
  sleep 0.1
done
wait $BENCH
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT

cat "$OUT/bench.txt"
python3 - "$OUT/bench.json" "$N" "$BASE" "$SERVER_MAX" "$BENCH_MAX" "$(grep -o 'last_fanout_ms=[0-9.]*' "$OUT/serve.err" | tail -1)" <<'PY'
import json, sys
path, n, base, smax, bmax, fanout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
r = json.load(open(path))["snapshot"]
rounds = [v for v in r["rounds"].values() if v["complete"]]
stamps = sorted(r["rounds"].keys(), key=int)
fan = [(r["rounds"][k]["last_us"] - int(k)) / 1000 for k in stamps if r["rounds"][k]["complete"]]
print(f"connections            {n}  (established {r['established']}, errors {sum(r['errors'].values())}, missed {sum(max(0, x['expected'] - x['delivered_expected']) for x in rounds)})")
print(f"server RSS             {base} KiB idle -> {smax} KiB at {n}: {(smax - base) * 1024 / n:.0f} B per connection")
print(f"bench RSS              {bmax} KiB: {bmax * 1024 / n:.0f} B per connection (whole process)")
print(f"setup                  {r['established']} in {r['ramp_secs']:.2f} s = {r['established'] / r['ramp_secs']:.0f} connections/s")
print(f"fan-out (stamp->last)  " + ", ".join(f"{f:.1f} ms" for f in fan) + f"   (server's own write loop: {fanout})")
PY
rm -rf "$OUT"
