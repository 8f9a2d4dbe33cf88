#!/usr/bin/python3
"""Ratios of a ../shared/peers run: Moonpost's end-to-end relay rate against
the smtp-source -> smtp-sink limit and against every other peer, from the
medians of its results.jsonl.

    peers_ratio.py RESULTS.jsonl
"""
import json
import statistics
import sys

rates = {}
with open(sys.argv[1]) as f:
    for line in f:
        r = json.loads(line)
        if r.get("complete") and r.get("e2e_rate"):
            rates.setdefault(r["peer"], []).append(r["e2e_rate"])

if "moonpost" not in rates:
    sys.exit("peers_ratio: no complete moonpost run in " + sys.argv[1])
med = {p: statistics.median(v) for p, v in rates.items()}
mp = med["moonpost"]
print("| peer | runs | e2e msg/s median (min-max) | moonpost / peer |")
print("|---|---|---|---|")
for p in sorted(med, key=lambda p: -med[p]):
    v = rates[p]
    print("| %s | %d | %.0f (%.0f-%.0f) | %.2f |" % (p, len(v), med[p], min(v), max(v), mp / med[p]))
if "postfix" in med:
    print("\nmoonpost relays %.1fx Postfix's rate (issue 8 target: 20x)" % (mp / med["postfix"]))
if "limit" in med:
    print("moonpost relays at %.2f of the smtp-source -> smtp-sink limit (issue 8 target: 0.40)" % (mp / med["limit"]))
