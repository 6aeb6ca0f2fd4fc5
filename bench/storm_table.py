#!/usr/bin/env python3
"""The table of bench/storm.sh from its results: python3 bench/storm_table.py OUT MODE N LABEL...

Reads OUT/LABEL.json (a `c1m bench --json` result), or OUT/LABEL.client.json (the merged
output of the lean C client, bench/storm_client.py) when there is one, and OUT/memory.txt ("LABEL RSS_AT_REST_KIB
RSS_PEAK_KIB" lines) and OUT/kernel.txt (the kernel's packet-loss counters before and after
each run) and prints a markdown table: setup rate, fan-out per round (stamp -> last client),
missed, errors, server memory per connection, the same-run ratios c1m / cws for setup and
c1m / raw for the slowest round's fan-out, and what the kernel dropped during the run.
"""
import json
import subprocess
import sys

out, mode, n, labels = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
memory = {}
try:
    for line in open(f"{out}/memory.txt"):
        label, rss0, peak = line.split()
        memory[label] = (int(rss0), int(peak))
except FileNotFoundError:
    pass

# storm.sh's "LABEL before... after..." kernel counters (see kernel_counters there).
kernel = {}
try:
    for line in open(f"{out}/kernel.txt"):
        label, *values = line.split()
        before, after = values[:4], values[4:]
        kernel[label] = [int(a) - int(b) for a, b in zip(after, before)]
except (FileNotFoundError, ValueError):
    pass

rows = {}
for label in labels:
    path = f"{out}/{label}.json"
    try:
        # A run with the lean C client (storm.sh --client c): its merged summary.
        rows[label] = json.load(open(f"{out}/{label}.client.json"))
        continue
    except (OSError, ValueError):
        pass
    try:
        summary = subprocess.run(["target/release/c1m", "report", "summary", path],
                                 capture_output=True, text=True, check=True).stdout
        s = json.loads(summary)
        rounds = json.load(open(path))["snapshot"]["rounds"]
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        rows[label] = None
        continue
    s["fanouts"] = [(rounds[k]["last_us"] - int(k)) / 1e6
                    for k in sorted(rounds, key=int) if rounds[k]["delivered"] > 0]
    rows[label] = s


def same_run(label, server):
    for name in ("-c1m-", "-cws-shared-", "-cws-", "-raw-"):
        label = label.replace(name, f"-{server}-")
    return rows.get(label)


print(f"{mode}, {n:,} connections")
print()
print("| run | established | errors | setup /s | fan-out per round (s) | missed "
      "| server mem (peak − rest) / conn | setup ÷ cws | slowest round ÷ raw "
      "| kernel: accept-queue overflows, SYN retransmits, TCP timeouts, backlog drops |")
print("|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
for label in labels:
    s = rows[label]
    if s is None:
        print(f"| {label} | failed | | | | | | | | |")
        continue
    cws, raw = same_run(label, "cws"), same_run(label, "raw")
    setup = f"{s['setup_rate'] / cws['setup_rate']:.2f}×" if cws and cws["setup_rate"] else "–"
    fan = "–"
    if raw and raw["fanouts"] and s["fanouts"]:
        fan = f"{max(s['fanouts']) / max(raw['fanouts']):.2f}×"
    rss0, peak = memory.get(label, (0, 0))
    per = (peak - rss0) * 1024 / max(1, s["established"])
    fanouts = ", ".join(f"{x:.2f}" for x in s["fanouts"])
    print(f"| {label} | {s['established']:,} | {s['errors']} | {s['setup_rate']:,.0f} | "
          f"{fanouts} | {s['missed']} | {per:.0f} B | {setup} | {fan} | "
          f"{', '.join(f'{x:,}' for x in kernel.get(label, [])) or '–'} |")
