#!/bin/bash
# make bench: throughput figures, each beside the limit measured in the same
# run (smtp-source straight into smtp-sink). Benchmarks are not tests: they
# print figures and ratios, they assert nothing.
#
#   accept-only   smtp-source -d -s 50 -m 50000 -l 1000 into Moonpost with a
#                 hook that discards the message (scripts/bench/accept.lua)
#
# Repetitions are interleaved (limit, moonpost, limit, moonpost, ...) and the
# table shows the median with min and max. Peak RSS is the Moonpost
# process's VmHWM. Results: var/bench/latest.json and var/bench/latest.md.
#
# Knobs: REPS (3), N (50000), C (50), SIZE (1000), PORT (base port, 3525).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
REPS=${REPS:-3}
N=${N:-50000}
C=${C:-50}
SIZE=${SIZE:-1000}
PORT=${PORT:-3525}
out=$root/var/bench
mkdir -p "$out"
raw=$out/raw.tsv
: >"$raw"

now() { date +%s.%N; }

wait_port() { # port -> 0 when something answers, bounded to 15 s
  i=0
  while [ $i -lt 150 ]; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
    i=$((i + 1))
  done
  echo "bench: nothing listens on port $1" >&2
  return 1
}

# source PORT -> seconds taken by smtp-source
source_run() {
  t0=$(now)
  timeout 600 smtp-source -d -s "$C" -m "$N" -l "$SIZE" -f bench@source.test -t sink@sink.test \
    "127.0.0.1:$1" >/dev/null
  t1=$(now)
  echo "$t0 $t1" | awk '{ printf "%.3f", $2 - $1 }'
}

run_limit() { # rep
  port=$PORT
  smtp-sink -u nobody "127.0.0.1:$port" 1024 &
  pid=$!
  wait_port "$port"
  secs=$(source_run "$port")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  printf 'limit\t%s\t%s\t-\n' "$1" "$secs" >>"$raw"
  echo "  limit    rep $1: $secs s" >&2
}

run_accept() { # rep
  port=$((PORT + 1))
  MOONPOST_LISTEN="127.0.0.1:$port" scripts/moonpost run scripts/bench/accept.lua 2>"$out/accept.log" &
  pid=$!
  wait_port "$port"
  secs=$(source_run "$port")
  hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  printf 'accept-only\t%s\t%s\t%s\n' "$1" "$secs" "$hwm" >>"$raw"
  echo "  accept   rep $1: $secs s, peak RSS $((hwm / 1024)) MiB" >&2
}

echo "bench: $REPS repetitions of smtp-source -d -s $C -m $N -l $SIZE" >&2
rep=1
while [ $rep -le "$REPS" ]; do
  run_limit $rep
  run_accept $rep
  rep=$((rep + 1))
done

# Medians, min, max and the ratio to the limit; JSON and markdown.
/usr/bin/python3 - "$raw" "$out" "$N" "$C" "$SIZE" <<'PY'
import json, statistics, sys, subprocess, platform
raw, out, n, c, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
rows = {}
for line in open(raw):
    name, rep, secs, hwm = line.rstrip("\n").split("\t")
    rows.setdefault(name, []).append((float(secs), None if hwm == "-" else int(hwm)))
def stats(name):
    rates = sorted(n / s for s, _ in rows[name])
    hwm = [h for _, h in rows[name] if h is not None]
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1],
            "runs": len(rates), "peak_rss_mib": max(hwm) / 1024 if hwm else None}
limit = stats("limit")
res = {"load": "smtp-source -d -s %s -m %d -l %s" % (c, n, size), "limit": limit, "figures": []}
targets = {"accept-only": ("rate >= 50% of limit, peak RSS < 50 MiB", 0.5, 50)}
for name in [k for k in rows if k != "limit"]:
    s = stats(name)
    s["name"] = name
    s["ratio"] = s["median"] / limit["median"]
    t = targets.get(name)
    s["target"] = t[0] if t else ""
    s["met"] = bool(t and s["ratio"] >= t[1] and (s["peak_rss_mib"] or 0) < t[2])
    res["figures"].append(s)
try:
    res["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
except Exception:
    res["commit"] = "?"
res["machine"] = "%s, %s cores" % (platform.platform(), __import__("os").cpu_count())
json.dump(res, open(out + "/latest.json", "w"), indent=2)
lines = ["| figure | msg/s median (min–max) | ratio to limit | peak RSS MiB | target | met |",
         "|---|---|---|---|---|---|",
         "| limit (smtp-source → smtp-sink) | %.0f (%.0f–%.0f) | 1.00 | – | – | – |" % (
             limit["median"], limit["min"], limit["max"])]
for s in res["figures"]:
    lines.append("| %s | %.0f (%.0f–%.0f) | %.2f | %.1f | %s | %s |" % (
        s["name"], s["median"], s["min"], s["max"], s["ratio"], s["peak_rss_mib"] or 0,
        s["target"], "yes" if s["met"] else "no"))
md = "\n".join(lines)
open(out + "/latest.md", "w").write(md + "\n")
print("load: %s, %d runs each, commit %s" % (res["load"], limit["runs"], res["commit"]))
print(md)
PY
