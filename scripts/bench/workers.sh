#!/bin/bash
# The scaling of worker processes (issue 8 item 3): the same load into
# Moonpost with 1 and with 2 workers (moonpost.new { workers = N }), for
# three policies (scripts/bench/workers.lua):
#
#   accept-only   smtp-source -d -s C -m N -l SIZE; every message discarded
#   durable       the same; every message spooled and fdatasynced before its 250
#   relay         the same into a relaying policy, until smtp-sink has every
#                 message (scripts/bench/relay.py with BENCH_POLICY)
#
# and the smtp-source -> smtp-sink limit of the same run. Repetitions are
# interleaved (1 worker, 2 workers, 1, 2, ...); the table shows the median
# rate with min and max and the ratio 2 workers / 1 worker; for accept-only
# and durable, also the CPU time per message of all Moonpost processes and
# of smtp-source (user + system, medians), which shows whether the machine's
# cores were the limit. The load
# generator and the sink share the machine's cores with the workers, so the
# scaling this shows on a 2-core machine is a floor, not a ceiling.
# Benchmarks are not tests: this prints figures and asserts nothing.
#
# Knobs: REPS (3), N (50000), C (50), SIZE (1000), PORT (base port, 3625),
# MODES ("accept-only durable relay"), WORKERS ("1 2").
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
REPS=${REPS:-3}
N=${N:-50000}
C=${C:-50}
SIZE=${SIZE:-1000}
PORT=${PORT:-3625}
MODES=${MODES:-accept-only durable relay}
WORKERS=${WORKERS:-1 2}
out=$root/var/bench/workers
mkdir -p "$out"
raw=$out/raw.tsv
: >"$raw"

# shellcheck source=scripts/bench/lib.sh
. "$root/scripts/bench/lib.sh"

source_run() { # port -> seconds taken by smtp-source
  t0=$(now)
  /usr/bin/time -o "$out/source.cpu" -f "%U %S" timeout 600 smtp-source -d -s "$C" -m "$N" -l "$SIZE" \
    -f bench@source.test -t sink@sink.test "127.0.0.1:$1" >/dev/null
  t1=$(now)
  echo "$t0 $t1" | awk '{ printf "%.3f", $2 - $1 }'
}

run_limit() { # rep
  smtp-sink -u nobody "127.0.0.1:$PORT" 1024 &
  pid=$!
  wait_port "$PORT"
  secs=$(source_run "$PORT")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  printf 'limit\t-\t%s\t%s\t\t\n' "$1" "$secs" >>"$raw"
  echo "  limit rep $1: $secs s" >&2
}

cpu_of() { # pid -> CPU seconds (user + system) of it and its children
  for q in "$1" $(pgrep -P "$1"); do awk '{ print $14 + $15 }' "/proc/$q/stat"; done |
    awk -v hz="$(getconf CLK_TCK)" '{ t += $1 } END { printf "%.2f", t / hz }'
}

run_one() { # mode workers rep
  mode=$1 w=$2 rep=$3 mcpu="" scpu=""
  if [ "$mode" = relay ]; then
    line=$(BENCH_POLICY=scripts/bench/workers.lua BENCH_MODE=relay BENCH_WORKERS=$w \
      /usr/bin/python3 scripts/bench/relay.py "$((PORT + 10))" "$N" "$C" "$SIZE")
    secs=$(echo "$line" | /usr/bin/python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.3f" % r["e2e_s"] if r["e2e_s"] else "")')
  else
    port=$((PORT + 1))
    spool=$out/spool
    rm -rf "$spool"
    BENCH_MODE=${mode%-only} BENCH_WORKERS=$w MOONPOST_LISTEN="127.0.0.1:$port" MOONPOST_SPOOL="$spool" \
      scripts/moonpost run scripts/bench/workers.lua 2>"$out/$mode-$w.log" &
    pid=$!
    wait_port "$port"
    # every worker listens (the port answers as soon as the first one does)
    i=0
    while [ "$w" -gt 1 ] && [ "$(grep -c ' serving (spool ' "$out/$mode-$w.log")" -lt "$w" ] && [ $i -lt 150 ]; do
      sleep 0.1
      i=$((i + 1))
    done
    c0=$(cpu_of "$pid")
    secs=$(source_run "$port")
    c1=$(cpu_of "$pid")
    mcpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')
    scpu=$(awk '{ printf "%.2f", $1 + $2 }' "$out/source.cpu")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$spool"
  fi
  if [ -n "$secs" ]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$w" "$rep" "$secs" "$mcpu" "$scpu" >>"$raw"
    echo "  $mode, $w worker(s), rep $rep: $secs s ($(awk -v n="$N" -v s="$secs" 'BEGIN { printf "%.0f", n / s }') msg/s)${mcpu:+, CPU: Moonpost $mcpu s, smtp-source $scpu s}" >&2
  else
    echo "  $mode, $w worker(s), rep $rep: failed" >&2
  fi
}

echo "bench: workers $WORKERS; $REPS repetitions of smtp-source -d -s $C -m $N -l $SIZE; $(nproc) cores" >&2
rep=1
while [ "$rep" -le "$REPS" ]; do
  run_limit "$rep"
  for mode in $MODES; do
    for w in $WORKERS; do run_one "$mode" "$w" "$rep"; done
  done
  rep=$((rep + 1))
done

/usr/bin/python3 - "$raw" "$N" "$WORKERS" <<'PY'
import os, statistics, sys
raw, n, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
rates, cpu = {}, {}
for line in open(raw):
    mode, w, rep, secs, mcpu, scpu = line.rstrip("\n").split("\t")
    rates.setdefault((mode, w), []).append(n / float(secs))
    if mcpu:
        # microseconds of CPU per message: Moonpost (all processes), smtp-source, and the
        # share of the machine's cores the two used over the run
        cores = os.cpu_count()
        cpu.setdefault((mode, w), []).append((float(mcpu) * 1e6 / n, float(scpu) * 1e6 / n,
                                               (float(mcpu) + float(scpu)) / (float(secs) * cores)))
def cell(r):
    return "%8.0f (%.0f-%.0f)" % (statistics.median(r), min(r), max(r)) if r else "-"
print("%-12s %s" % ("msg/s", "  ".join("%-24s" % ("%s worker%s" % (w, "" if w == "1" else "s")) for w in workers))
      + "  ratio %s/%s" % (workers[-1], workers[0]))
lim = rates.get(("limit", "-"), [])
print("%-12s %s" % ("limit", cell(lim)))
for mode in ("accept-only", "durable", "relay"):
    rs = [rates.get((mode, w), []) for w in workers]
    if not any(rs):
        continue
    ratio = (statistics.median(rs[-1]) / statistics.median(rs[0])) if rs[0] and rs[-1] else float("nan")
    print("%-12s %s  %.2f" % (mode, "  ".join("%-24s" % cell(r) for r in rs), ratio))
if cpu:
    print()
    print("CPU per message (medians): Moonpost, smtp-source; share of all %d cores busy" % os.cpu_count())
    for (mode, w), v in sorted(cpu.items()):
        med = lambda i: statistics.median(x[i] for x in v)
        print("  %-12s %s worker%s  %6.1f us  %6.1f us  %3.0f %%" % (mode, w, "" if w == "1" else "s", med(0), med(1),
                                                               100 * med(2)))
PY
