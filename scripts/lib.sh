# Helpers shared by the benchmark scripts (sourced, not run).

# rss_kib PID...: the summed resident memory of the processes, in KiB (0 for a process
# that is gone).
rss_kib() {
  local t=0 v p
  for p in "$@"; do
    v=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    t=$((t + ${v:-0}))
  done
  echo $t
}

# free_port: a TCP port on 127.0.0.1 that was free a moment ago.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# cpu_secs PID...: user + system CPU seconds the processes have used (0 for one that is gone).
cpu_secs() {
  local p
  for p in "$@"; do
    awk '{ print ($14 + $15) / 100 }' "/proc/$p/stat" 2>/dev/null || echo 0
  done | awk '{ t += $1 } END { printf "%.2f", t }'
}

# stop_started_on_exit: on exit, stops the server and the bench the script started
# (their PIDs in SERVER_PID and BENCH_PID; empty when none is running).
stop_started_on_exit() {
  SERVER_PID=""
  BENCH_PID=""
  trap 'stop_started' EXIT
}
stop_started() {
  [ -n "$BENCH_PID" ] && kill "$BENCH_PID" 2>/dev/null
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
  wait 2>/dev/null || true
}
