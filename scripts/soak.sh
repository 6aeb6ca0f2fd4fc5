#!/usr/bin/env bash
# Churn soak: N clients that each live ~LIFETIME and reconnect at once, for DURATION, against
# one `c1m serve --workers 1`. The server's RSS is sampled once the first ramp is done
# (baseline) and again at the end, with the same number of clients connected: a leak shows as
# growth. Then the server is restarted under the clients' feet and they must all come back.
#
#   scripts/soak.sh [N] [DURATION_S] [LIFETIME]      (defaults: 19000 60 2s)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-19000}
DURATION=${2:-60}
LIFETIME=${3:-2s}
PORT=${PORT:-18150}
cargo build --release -q
BIN=target/release/c1m
OUT=$(mktemp -d)
source scripts/lib.sh
start_server() {
  $BIN serve --listen 127.0.0.1:$PORT --workers 1 --connect-only --close-timeout 500ms >/dev/null 2>>"$OUT/serve.err" &
  SERVER=$!
}
start_server
trap 'kill $SERVER 2>/dev/null || true' EXIT
sleep 0.5
IDLE=$(rss_kib $SERVER)
$BIN bench --url ws://127.0.0.1:$PORT/ -c "$N" --rate 20000 --reconnect --lifetime "$LIFETIME" \
  --duration "$((DURATION + 10))s" --source-ips 127.0.0.2-127.0.0.21 --quiet --json "$OUT/soak.json" >"$OUT/soak.txt" &
BENCH=$!
sleep 5
BASE=$(rss_kib $SERVER)
sleep "$((DURATION - 5))"
AFTER=$(rss_kib $SERVER)
echo "server RSS: idle $IDLE KiB, after ramp $BASE KiB, after ${DURATION}s of churn $AFTER KiB ($(python3 -c "print(f'{($AFTER - $BASE) / $BASE * 100:+.1f}')") %)"
# Restart the server: every client must reconnect by itself.
kill $SERVER; wait $SERVER 2>/dev/null || true
sleep 1
start_server
wait $BENCH
python3 - "$OUT/soak.json" "$N" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["snapshot"]
print(f"clients {sys.argv[2]}: established {s['established']}, reconnects {s['reconnects']}, held at the end {s['active']}")
print(f"errors: {s['errors']}")
PY
rm -rf "$OUT"
