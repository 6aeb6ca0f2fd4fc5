#!/usr/bin/env python3
"""Markdown table of `c1m demo` results: bench/table.py OUT_DIR SCALE... (see bench/scales.sh)."""
import json
import re
import sys


def row(out, n):
    result = json.load(open(f"{out}/demo-{n}.json"))
    s = result["snapshot"]
    text = open(f"{out}/demo-{n}.txt").read()

    def grab(pattern):
        return re.search(pattern, text, re.S).group(1)

    rounds = sorted(s["rounds"].items(), key=lambda kv: int(kv[0]))
    fan = ", ".join("%.2f s" % ((r["last_us"] - int(stamp)) / 1e6) for stamp, r in rounds)
    missed = sum(max(0, r["expected"] - r["delivered_expected"]) for _, r in rounds if r["complete"])
    errors = sum(s["errors"].values())
    setup = "%s/s (%s in %.1f s)" % (format(round(s["established"] / s["ramp_secs"]), ","), format(s["established"], ","), s["ramp_secs"])
    latency = "%s / %s / %s ms" % (grab(r"median = ([\d.]+)"), grab(r"99% <= ([\d.]+)"), grab(r"max = ([\d.]+)"))
    cells = [
        format(int(n), ",") if n.isdigit() else n,
        setup,
        fan,
        latency,
        str(missed),
        str(errors),
        grab(r"per connection: (\d+) B") + " B",
        grab(r"MiB idle, ([\d.]+) MiB peak") + " MiB",
        grab(r"processes\): ([\d.]+) MiB peak") + " MiB",
        grab(r"server CPU time: ([\d.]+)") + " / " + grab(r"bench CPU time[^:]*: ([\d.]+)"),
    ]
    return "| " + " | ".join(cells) + " |"


def main():
    out, scales = sys.argv[1], sys.argv[2:]
    print("| connections | setup | fan-out to all (stamp → last client, per round) | latency p50 / p99 / max | missed | errors | server user mem / conn | server RSS peak | bench RSS peak | CPU s server / bench |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in scales:
        print(row(out, n))


main()
