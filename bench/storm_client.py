#!/usr/bin/env python3
"""Merges the JSON lines of bench/peers/baseline/client.c (one per process) into one
summary: python3 bench/storm_client.py LINES.jsonl > SUMMARY.json

The summary has the fields bench/storm_table.py reads from `c1m report summary`:
established, errors, setup_rate (established / (last 101 - first connect call)), missed,
connect_p50/p99/max_ms, plus fanouts (per round stamped while connections were open:
last arrival - stamp, seconds), errors_by_cause and unfinished (deliveries still awaited
for rounds stamped in the last 30 s of a process's run, which was cut by its duration;
not counted as missed).
"""
import json
import sys

procs = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
if not procs:
    sys.exit("no client output")
errors = {}
hist = {}
rounds = {}
missed = unfinished = 0
for p in procs:
    for cause, n in p["errors"].items():
        if n:
            errors[cause] = errors.get(cause, 0) + n
    for ms, n in p["connect_ms"].items():
        hist[int(ms)] = hist.get(int(ms), 0) + n
    for stamp, expected, received, last in p["rounds"]:
        r = rounds.setdefault(stamp, [0, 0, stamp])
        r[0] += expected
        r[1] += received
        if received:
            r[2] = max(r[2], last)
        if stamp > p["end"] - 30_000:
            unfinished += expected - received
        else:
            missed += expected - received


def percentile(q):
    total, seen = sum(hist.values()), 0
    for ms in sorted(hist):
        seen += hist[ms]
        if seen >= q * total:
            return float(ms)
    return 0.0


established = sum(p["established"] for p in procs)
opens = [p["last_open"] for p in procs if p["last_open"] > 0]
start = min(p["start"] for p in procs)
ramp = (max(opens) - start) / 1000 if opens else 0
print(json.dumps({
    "established": established,
    "errors": sum(errors.values()),
    "errors_by_cause": errors,
    "setup_rate": established / ramp if ramp > 0 else 0.0,
    "missed": missed,
    "unfinished": unfinished,
    "connect_p50_ms": percentile(0.5),
    "connect_p99_ms": percentile(0.99),
    "connect_max_ms": float(max(hist)) if hist else 0.0,
    "fanouts": [(r[2] - s) / 1000 for s, r in sorted(rounds.items()) if r[1] > 0],
    "rounds": [{"stamp": s, "expected": r[0], "received": r[1]} for s, r in sorted(rounds.items())],
}))
