#!/usr/bin/env bash
# Memory of topic history: one c1m process (--workers 1) with --history-size 10, a
# publisher that sends PUBS publications of a 64-byte text to each of T topics over one
# kept-alive HTTP connection, then the server's own account (c1m_history_bytes,
# c1m_history_publications) and its RSS growth, for T = 1,000 and 100,000.
#
#   bench/history.sh [--pubs N]      (default 3 publications per topic)
# Listens on 127.0.0.1 only; stops what it started by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
PUBS=3
while [ $# -gt 0 ]; do
  case $1 in
    --pubs) PUBS=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
source scripts/lib.sh
cargo build --release -q
BIN=target/release/c1m
OUT=bench/out/history
mkdir -p "$OUT"
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null || true' EXIT
echo "| topics | publications kept | c1m_history_bytes | per publication | server RSS growth | per publication (RSS) |"
echo "|---:|---:|---:|---:|---:|---:|"
for TOPICS in 1000 100000; do
  port=$(free_port)
  RUST_LOG=warn $BIN serve --listen "127.0.0.1:$port" --workers 1 --connect-only \
    --api-key k --history-size 10 --history-max-bytes 4294967296 >"$OUT/server-$TOPICS.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do grep -q listening "$OUT/server-$TOPICS.log" && break; sleep 0.1; done
  rss0=$(rss_kib "$SERVER_PID")
  python3 - "$port" "$TOPICS" "$PUBS" <<'PY'
import http.client, json, sys
port, topics, pubs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
payload = "x" * 64
for round_ in range(pubs):
    for t in range(topics):
        body = json.dumps({"topic": f"topic-{t}", "message": payload})
        conn.request("POST", "/publish", body, {"Authorization": "Bearer k", "Content-Type": "application/json"})
        r = conn.getresponse(); r.read()
        if r.status != 200:
            sys.exit(f"publish answered {r.status}")
PY
  rss1=$(rss_kib "$SERVER_PID")
  metrics=$(curl -s "http://127.0.0.1:$port/metrics")
  bytes=$(echo "$metrics" | awk '$1=="c1m_history_bytes"{print $2}')
  kept=$(echo "$metrics" | awk '$1=="c1m_history_publications"{print $2}')
  python3 -c "import sys; t,k,b,r0,r1=map(int,sys.argv[1:]); print(f'| {t:,} | {k:,} | {b:,} B | {b/k:.0f} B | {(r1-r0)*1024:,} B | {(r1-r0)*1024/k:.0f} B |')" \
    "$TOPICS" "$kept" "$bytes" "$rss0" "$rss1"
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
done
