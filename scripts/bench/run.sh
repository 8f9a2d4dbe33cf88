#!/bin/bash
# make bench: throughput figures, each beside the limit measured in the same
# run (smtp-source straight into smtp-sink). Benchmarks are not tests: they
# print figures and ratios, they assert nothing.
#
#   accept-only   smtp-source -d -s 50 -m 50000 -l 1000 into Moonpost with a
#                 hook that discards the message (scripts/bench/accept.lua)
#   durable       the same load; every message is written to the spool and
#                 fdatasynced before its 250 (scripts/bench/durable.lua);
#                 reports the group-commit batch size and fsyncs per second
#   durable-mem   durable with the spool on /dev/shm (tmpfs: a sync waits for
#                 no device): the code's share of durable's cost; not durable
#   relay         end to end: the same load into examples/relay.lua (durable
#                 spool) relaying to smtp-sink, until the sink has every
#                 message (scripts/bench/relay.py); with the median and 99th
#                 percentile time from the 250 to the start of the delivery
#   relay-2w      the relay with two worker processes (scripts/bench/workers.lua)
#   relay-mp-plain, relay-mp-tls
#                 the relay again, into a Moonpost sink (scripts/bench/sink.lua)
#                 instead of smtp-sink: in plaintext, and over TLS (policy
#                 "required", TLS 1.3, ECDSA P-256 certificate); the ratio of
#                 the two is the cost of TLS on the sending side and the sink
#   relay-dkim-rsa, relay-dkim-ed25519
#                 the relay with every message DKIM-signed before it is
#                 spooled (scripts/bench/relay_dkim.lua), with an RSA-2048 and
#                 an Ed25519 key made by scripts/dkim-keygen; beside them,
#                 `openssl speed -multi 2` sign rates of the same machine, and
#                 the signer alone (scripts/bench/dkim_sign.lua) on the same keys
#   memory        bytes per queued message at MEMORY_N (1000000) messages
#   suppress      the suppression store with SUPPRESS_N (1000000) entries: load
#                 time, octets per entry, lookup ns, compaction
#                 (scripts/bench/suppress.lua; 0 skips)
#   recovery      time to recover a spool of RECOVERY_N queued messages
#                 (default 1000000; 0 skips), page cache warm and dropped
#   postfix       Postfix's durable acceptance of the same load (smtp-source
#                 -d) through ../shared/peers when it is there (BENCH_POSTFIX=0
#                 skips it; POSTFIX_N messages, default 10000, POSTFIX_REPS
#                 runs, default 3)
#
# Repetitions are interleaved (limit, moonpost, limit, moonpost, ...) and the
# table shows the median with min and max. Peak RSS is the Moonpost
# process's VmHWM (for the relay rows summed over its processes: relay-2w's
# supervisor and workers). For every relay row, the CPU time per message of Moonpost
# (all its processes), smtp-source and the sink: the machine's cores divided
# by their sum is the rate these programs could reach with every core busy,
# and the run's rate over it is how busy the cores were; beside them, the
# read and write system calls per message of Moonpost and the sink, which
# the machine's speed does not move. Results: var/bench/latest.json and var/bench/latest.md.
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

# shellcheck source=scripts/bench/lib.sh
. "$root/scripts/bench/lib.sh"

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

run_moonpost() { # name policy rep [spool parent directory]
  port=$((PORT + 1))
  spool=${4:-$out}/spool-$1
  rm -rf "$spool"
  MOONPOST_LISTEN="127.0.0.1:$port" MOONPOST_SPOOL="$spool" scripts/moonpost run "$2" 2>"$out/$1.log" &
  pid=$!
  wait_port "$port"
  read -r cpu0 sys0 < <(awk '{ print $14 + $15, $15 }' "/proc/$pid/stat")
  secs=$(source_run "$port")
  read -r cpu1 sys1 < <(awk '{ print $14 + $15, $15 }' "/proc/$pid/stat")
  # Moonpost's CPU time per message (no figure for smtp-source here)
  cpu=$(awk -v a="$((cpu1 - cpu0))" -v b="$((sys1 - sys0))" -v hz="$(getconf CLK_TCK)" -v n="$N" \
    'BEGIN { printf "%.1f/0/0/%.1f", a / hz * 1e6 / n, b / hz * 1e6 / n }')
  hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  extra=""
  stats=$(grep -o 'spool: closed: .*' "$out/$1.log" || true)
  if [ -n "$stats" ]; then
    stored=$(echo "$stats" | awk '{ print $3 }')
    batches=$(echo "$stats" | awk '{ print $5 }')
    fsyncs=$(echo "$stats" | awk '{ print $8 }')
    extra="$stored/$batches/$fsyncs"
    echo "  $1 rep $3: $secs s, peak RSS $((hwm / 1024)) MiB, $stored stored in $batches batches, $fsyncs fsyncs" >&2
  else
    echo "  $1 rep $3: $secs s, peak RSS $((hwm / 1024)) MiB" >&2
  fi
  printf '%s\t%s\t%s\t%s\t%s\t\t%s\n' "$1" "$3" "$secs" "$hwm" "$extra" "$cpu" >>"$raw"
  rm -rf "$spool"
}

# relay_row rep name n c size [VAR=value ...] [-- smtp-source args ...]: the
# relay of scripts/bench/relay.py with n messages over c sessions of size
# octets, in that environment; the time is scaled to N messages so that the
# table's rate is messages per second of this load. Also kept: peak RSS,
# the 250-to-first-attempt percentiles and the CPU time per message of
# Moonpost, smtp-source, the sink and Moonpost's kernel share.
relay_row() {
  local rep=$1 rname=$2 rn=$3 rc=$4 rsize=$5 envs=() line fields e2e hwm lat cpu rate rw
  shift 5
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    envs+=("$1")
    shift
  done
  [ "${1:-}" = "--" ] && shift
  if line=$(env "${envs[@]}" /usr/bin/python3 scripts/bench/relay.py "$((PORT + 10))" "$rn" "$rc" "$rsize" "$@") &&
    fields=$(echo "$line" | /usr/bin/python3 -c '
import json, sys
r, n, scale = json.load(sys.stdin), int(sys.argv[1]), int(sys.argv[2])
if not r["e2e_s"]:
    sys.exit(1)
c, w = r["cpu_us_per_msg"], r["rw_calls_per_msg"]
print("%.3f %d %s/%s %s/%s/%s/%s %d %s/%s" % (r["e2e_s"] * scale / n, r["rss_kib"], r["latency_p50_ms"], r["latency_p99_ms"],
      c["moonpost"], c["source"], c["sink"], c["moonpost_system"], round(n / r["e2e_s"]), w["moonpost"], w["sink"]))' "$rn" "$N"); then
    read -r e2e hwm lat cpu rate rw <<<"$fields"
    printf '%s\t%s\t%s\t%s\t\t%s\t%s\t%s\n' "$rname" "$rep" "$e2e" "$hwm" "$lat" "$cpu" "$rw" >>"$raw"
    echo "  $rname rep $rep: $rn messages, $rate msg/s end to end, peak RSS $((hwm / 1024)) MiB," \
      "250 to first attempt p50/p99 $lat ms, CPU us/msg Moonpost/source/sink/Moonpost-in-kernel $cpu" >&2
    return
  fi
  echo "  $rname rep $rep: failed ($line)" >&2
}

run_postfix() {
  peers=$root/../shared/peers
  if [ "${BENCH_POSTFIX:-1}" = 0 ] || [ ! -x "$peers/run.sh" ]; then
    echo "  postfix: skipped (no ../shared/peers, or BENCH_POSTFIX=0)" >&2
    return
  fi
  pn=${POSTFIX_N:-10000}
  rm -rf "$out/postfix"
  # several runs, as Moonpost's figures: one Postfix run here has ranged
  # from 290 to 451 msg/s relayed between bench runs
  if (cd "$peers" && SETUP=0 N="$pn" C="$C" SIZE="$SIZE" REPS="${POSTFIX_REPS:-3}" SOURCE_EXTRA="-d" OUT="$out/postfix" \
      ./run.sh postfix >"$out/postfix.log" 2>&1); then
    /usr/bin/python3 - "$out/postfix/results.jsonl" "$raw" "$pn" "$N" <<'PY'
import json, sys
n_pf, n = int(sys.argv[3]), int(sys.argv[4])
rep = 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("peer") == "postfix" and r.get("inject_s"):
        rep += 1
        # scaled to N messages so that the rates compare
        open(sys.argv[2], "a").write("postfix\t%d\t%.3f\t-\t\n" % (rep, r["inject_s"] * n / n_pf))
        print("  postfix rep %d: %.0f msg/s durable acceptance (%d messages)" % (rep, n_pf / r["inject_s"], n_pf),
              file=sys.stderr)
        if r.get("e2e_s"):
            open(sys.argv[2], "a").write("postfix-relay\t%d\t%.3f\t-\t\n" % (rep, r["e2e_s"] * n / n_pf))
            print("  postfix rep %d: %.0f msg/s end to end" % (rep, n_pf / r["e2e_s"]), file=sys.stderr)
PY
  else
    echo "  postfix: the peers harness failed (see $out/postfix.log)" >&2
  fi
}

certs=$out/certs
rm -rf "$certs" "$out/dkim"
spec/tools/mkcerts.sh "$certs"
scripts/dkim-keygen --type rsa --bits 2048 --domain bench.test --selector rsa --dir "$out/dkim" >/dev/null 2>&1
scripts/dkim-keygen --type ed25519 --domain bench.test --selector ed --dir "$out/dkim" >/dev/null 2>&1
echo "bench: $REPS repetitions of smtp-source -d -s $C -m $N -l $SIZE" >&2
rep=1
while [ $rep -le "$REPS" ]; do
  run_limit $rep
  run_moonpost accept-only scripts/bench/accept.lua $rep
  run_moonpost durable scripts/bench/durable.lua $rep
  # the same with the spool in memory (tmpfs: fdatasync waits for no
  # device): the code's share of durable's cost, apart from the disk's
  [ -d /dev/shm ] && [ -w /dev/shm ] && run_moonpost durable-mem scripts/bench/durable.lua $rep /dev/shm
  relay_row $rep relay "$N" "$C" "$SIZE"
  # the same relay with two worker processes (docs/cli.md#workers)
  relay_row $rep relay-2w "$N" "$C" "$SIZE" BENCH_POLICY=scripts/bench/workers.lua BENCH_MODE=relay BENCH_WORKERS=2
  # TLS: the same relay into a Moonpost sink, in plaintext and over TLS
  relay_row $rep relay-mp-plain "$N" "$C" "$SIZE" BENCH_POLICY=scripts/bench/relay_tls.lua BENCH_TLS=none BENCH_SINK=moonpost \
    BENCH_SINK_CERT="$certs/mx.pem" BENCH_SINK_KEY="$certs/mx.key"
  relay_row $rep relay-mp-tls "$N" "$C" "$SIZE" BENCH_POLICY=scripts/bench/relay_tls.lua BENCH_TLS=required BENCH_SINK=moonpost \
    BENCH_SINK_CERT="$certs/mx.pem" BENCH_SINK_KEY="$certs/mx.key"
  # DKIM: the relay with every message signed
  # (a fifth of the messages: signing on both cores is the limit, reached
  # within seconds)
  relay_row $rep relay-dkim-rsa "$((N / 5))" "$C" "$SIZE" BENCH_POLICY=scripts/bench/relay_dkim.lua BENCH_DKIM_DIR="$out/dkim" \
    BENCH_DKIM_SELECTOR=rsa
  relay_row $rep relay-dkim-ed25519 "$N" "$C" "$SIZE" BENCH_POLICY=scripts/bench/relay_dkim.lua BENCH_DKIM_DIR="$out/dkim" \
    BENCH_DKIM_SELECTOR=ed
  # other loads: 10 recipients per message, 100 kB messages, and about half
  # the peak rate (2 sessions) for the latency from the 250 to the attempt
  relay_row $rep relay-r10 "$((N / 5))" "$C" "$SIZE" -- -r 10
  relay_row $rep relay-100k "$((N / 10))" "$C" 100000
  relay_row $rep relay-half "$((N / 2))" 2 "$SIZE"
  rep=$((rep + 1))
done
# What the machine can sign: openssl speed on both cores, and on one
speed() { # args -> sign/s of the last line
  timeout 120 openssl speed -seconds 3 "$@" 2>/dev/null | tail -1 | awk '{ print $(NF-1) }'
}
{
  echo "rsa2048_multi $(speed -multi "$(nproc)" rsa2048)"
  echo "rsa2048_one $(speed rsa2048)"
  echo "ed25519_multi $(speed -multi "$(nproc)" ed25519)"
  echo "ed25519_one $(speed ed25519)"
} >"$out/openssl-speed.txt"
sed 's/^/  openssl speed: /; s/$/ signs\/s/' "$out/openssl-speed.txt" >&2
# The signer alone, on the same keys: the engine against openssl speed
{
  luajit scripts/bench/dkim_sign.lua "$out/dkim/bench.test/rsa.pem" 4000 "$SIZE"
  luajit scripts/bench/dkim_sign.lua "$out/dkim/bench.test/ed.pem" 40000 "$SIZE"
} >"$out/dkim-sign.txt" 2>&1 || true
sed 's/^/  /' "$out/dkim-sign.txt" >&2
if [ "${SUPPRESS_N:-1000000}" != 0 ]; then
  echo "  suppress: a store of ${SUPPRESS_N:-1000000} entries" >&2
  luajit scripts/bench/suppress.lua "${SUPPRESS_N:-1000000}" >"$out/suppress.txt" 2>&1 || true
  sed 's/^/  /' "$out/suppress.txt" >&2
fi
run_postfix
if [ "${CONNS_K:-500000}" != 0 ]; then
  # the full target, 500000 sessions for 30 s, is K=500000 HOLD=30 scripts/bench/conns.sh
  echo "  conns: ${CONNS_K:-500000} idle sessions held after EHLO by worker processes" >&2
  K=${CONNS_K:-500000} HOLD=${CONNS_HOLD:-30} PORT=$((PORT + 200)) JSON="$out/conns.json" \
    scripts/bench/conns.sh >"$out/conns.txt" 2>&1 || true
  sed 's/^/  /' "$out/conns.txt" >&2
fi
if [ "${MEMORY_N:-1000000}" != 0 ]; then
  echo "  memory: a queue of ${MEMORY_N:-1000000} messages" >&2
  luajit scripts/bench/memory.lua "${MEMORY_N:-1000000}" >"$out/memory.txt" 2>&1 || true
  sed 's/^/  /' "$out/memory.txt" >&2
fi
if [ "${RECOVERY_N:-1000000}" != 0 ]; then
  echo "  recovery: writing and recovering a spool of ${RECOVERY_N:-1000000} messages" >&2
  luajit scripts/bench/recovery.lua "${RECOVERY_N:-1000000}" "$SIZE" >"$out/recovery.txt" 2>&1 || true
  sed 's/^/  /' "$out/recovery.txt" >&2
fi

# Medians, min, max and the ratio to the limit; JSON and markdown.
/usr/bin/python3 - "$raw" "$out" "$N" "$C" "$SIZE" <<'PY'
import json, os, statistics, sys, subprocess, platform
ncpu = os.cpu_count()
raw, out, n, c, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
rows, extra, latency, cpu, byrep, rwcalls = {}, {}, {}, {}, {}, {}
for line in open(raw):
    f = line.rstrip("\n").split("\t")
    name, rep, secs, hwm = f[:4]
    rows.setdefault(name, []).append((float(secs), None if hwm == "-" else int(hwm)))
    byrep.setdefault(name, {})[rep] = n / float(secs)
    if len(f) > 4 and f[4]:
        stored, batches, fsyncs = (int(x) for x in f[4].split("/"))
        extra.setdefault(name, []).append((stored, batches, fsyncs, float(secs)))
    if len(f) > 5 and f[5] and "None" not in f[5]:
        p50, p99 = (float(x) for x in f[5].split("/"))
        latency.setdefault(name, []).append((p50, p99))
    if len(f) > 6 and f[6]:
        cpu.setdefault(name, []).append([float(x) for x in f[6].split("/")])
    if len(f) > 7 and f[7]:
        rwcalls.setdefault(name, []).append([float(x) for x in f[7].split("/")])
def stats(name):
    rates = sorted(n / s for s, _ in rows[name])
    hwm = [h for _, h in rows[name] if h is not None]
    st = {"median": statistics.median(rates), "min": rates[0], "max": rates[-1],
          "runs": len(rates), "peak_rss_mib": max(hwm) / 1024 if hwm else None}
    if name in extra:
        st["batch_size"] = statistics.median(s / b for s, b, _, _ in extra[name] if b)
        st["fsyncs_per_s"] = statistics.median(f / t for _, _, f, t in extra[name])
    if name in cpu:
        # CPU time per message of Moonpost, smtp-source and the sink, and
        # the rate the machine's cores could give at that cost: the run's
        # rate over it says how busy the cores were
        m, s_, k, ks = (statistics.median(c[i] for c in cpu[name]) for i in range(4))
        st["cpu_us_per_msg"] = {"moonpost": m, "source": s_, "sink": k, "moonpost_system": ks}
        if s_ > 0 and k > 0:
            st["cpu_ceiling"] = ncpu * 1e6 / (m + s_ + k)
            st["cpu_busy"] = statistics.median(rates) / st["cpu_ceiling"]
    if name in rwcalls:
        # read and write system calls per message (socket and file): a
        # figure the machine's speed does not move
        st["rw_calls_per_msg"] = {"moonpost": statistics.median(w[0] for w in rwcalls[name]),
                                  "sink": statistics.median(w[1] for w in rwcalls[name])}
    if name in latency:
        st["latency_p50_ms"] = statistics.median(p for p, _ in latency[name])
        st["latency_p99_ms"] = statistics.median(q for _, q in latency[name])
    return st
limit = stats("limit")
res = {"load": "smtp-source -d -s %s -m %d -l %s" % (c, n, size), "limit": limit, "figures": []}
figs = {k: stats(k) for k in rows if k != "limit"}
speed = {}
try:
    for line in open(out + "/openssl-speed.txt"):
        k, _, v = line.strip().partition(" ")
        if v:
            speed[k] = float(v)
except (OSError, ValueError):
    pass
def paired(a, b):
    """The ratio a/b of each repetition (both ran within minutes of each
    other, so the machine's drift over the whole run cancels): median, min,
    max; or None."""
    ra, rb = byrep.get(a, {}), byrep.get(b, {})
    rs = sorted(ra[k] / rb[k] for k in ra if k in rb)
    if not rs:
        return None
    return {"median": statistics.median(rs), "min": rs[0], "max": rs[-1]}
def paired_text(p):
    return "per repetition %.2f (%.2f-%.2f)" % (p["median"], p["min"], p["max"]) if p else ""
acc, dur, pf = figs.get("accept-only"), figs.get("durable"), figs.get("postfix")
pfr = figs.get("postfix-relay")
def relay_target(s, label, share, times_postfix):
    """A relay row against its targets: share of the limit, times Postfix."""
    s["paired_ratio"] = paired(s["name"], "limit")
    s["target"] = "%srate >= %d%% of limit (%.2f; %s)" % (label, round(share * 100), s["ratio"],
                                                         paired_text(s["paired_ratio"]))
    s["met"] = s["ratio"] >= share
    if pfr:
        s["vs_postfix"] = s["median"] / pfr["median"]
        s["target"] += ", >= %dx Postfix relaying (%.1fx)" % (times_postfix, s["vs_postfix"])
        s["met"] = s["met"] and s["vs_postfix"] >= times_postfix
for name, s in figs.items():
    s["name"] = name
    s["ratio"] = s["median"] / limit["median"]
    s["target"], s["met"] = "", None
    if name == "accept-only":
        s["target"] = "rate >= 50% of limit, peak RSS < 50 MiB"
        s["met"] = s["ratio"] >= 0.5 and (s["peak_rss_mib"] or 0) < 50
    if name in ("durable", "durable-mem") and acc:
        s["vs_accept_only"] = s["median"] / acc["median"]
        s["paired_vs_accept_only"] = paired(name, "accept-only")
    if name == "durable" and acc:
        s["target"] = "rate >= 80%% of accept-only (%.2f; %s)" % (s["vs_accept_only"], paired_text(s["paired_vs_accept_only"]))
        s["met"] = s["vs_accept_only"] >= 0.8
        if pf:
            s["vs_postfix"] = s["median"] / pf["median"]
            s["target"] += ", >= 10x Postfix (%.1fx)" % s["vs_postfix"]
            s["met"] = s["met"] and s["vs_postfix"] >= 10
        if "cpu_us_per_msg" in s and "cpu_us_per_msg" in acc:
            s["target"] += "; Moonpost CPU %.0f us/msg against %.0f accept-only" % (
                s["cpu_us_per_msg"]["moonpost"], acc["cpu_us_per_msg"]["moonpost"])
    if name == "durable-mem" and acc:
        s["target"] = "reported: the spool on tmpfs, not durable; %.2f of accept-only (%s)" % (
            s["vs_accept_only"], paired_text(s["paired_vs_accept_only"]))
    if name == "relay":
        relay_target(s, "", 0.35, 10)  # issue 4
        # issue 8 asks more of the same row: 40 % of the limit, 20x Postfix;
        # "met" is for both, the text says which part holds
        met4 = s["met"]
        s["met_issue8"] = s["ratio"] >= 0.40 and bool(pfr) and s["median"] / pfr["median"] >= 20
        s["target"] += "; issue 8: >= 40%% of limit and >= 20x Postfix relaying: %s" % (
            "yes" if s["met_issue8"] else "no")
        s["met"] = met4 and s["met_issue8"]
        c = s.get("cpu_us_per_msg")
        if pfr and c:
            # What 20x Postfix would leave Moonpost: the cores' time per
            # message at that rate, less what smtp-source and the sink
            # spent per message in this run; beside it, Moonpost's kernel
            # time alone (the system calls of one receiving and one
            # sending SMTP hop, and the spool's).
            want = 20 * pfr["median"]
            s["budget_at_20x_postfix_us"] = ncpu * 1e6 / want - c["source"] - c["sink"]
            s["target"] += "; at 20x Postfix (%.0f msg/s) the cores leave Moonpost %.0f us a message after smtp-source and the sink (%.0f), against its %.0f us in the kernel alone" % (
                want, s["budget_at_20x_postfix_us"], c["source"] + c["sink"], c["moonpost_system"])
        if "latency_p50_ms" in s:
            s["target"] += "; 250 to first attempt p50 %.2f ms, p99 %.2f ms" % (s["latency_p50_ms"], s["latency_p99_ms"])
    if name == "relay-2w":
        relay_target(s, "2 worker processes: ", 0.40, 20)  # issue 8
        if figs.get("relay"):
            s["target"] += "; %.2fx one process" % (s["median"] / figs["relay"]["median"])
    if name == "relay-dkim-ed25519" and figs.get("relay"):
        s["vs_unsigned"] = s["median"] / figs["relay"]["median"]
        s["paired_vs_unsigned"] = paired("relay-dkim-ed25519", "relay")
        s["target"] = "Ed25519 relay >= 70%% of unsigned relay (%.2f; %s)" % (s["vs_unsigned"], paired_text(s["paired_vs_unsigned"]))
        s["met"] = s["vs_unsigned"] >= 0.7
        if speed.get("ed25519_multi"):
            s["target"] += "; openssl speed -multi ed25519: %.0f signs/s" % speed["ed25519_multi"]
    if name == "relay-dkim-rsa" and speed.get("rsa2048_multi"):
        s["vs_openssl"] = s["median"] / speed["rsa2048_multi"]
        s["target"] = "RSA-2048 relay >= 70%% of openssl speed -multi rsa2048 (%.0f signs/s): %.2f" % (
            speed["rsa2048_multi"], s["vs_openssl"])
        s["met"] = s["vs_openssl"] >= 0.7
        c = figs.get("relay", {}).get("cpu_us_per_msg")
        if c:
            # The most a relay signing every message can reach, as a share
            # of what openssl signs on all cores: sign / (sign + the rest
            # of a message's CPU); the rest is smtp-source and the sink
            # alone (an MTA that costs nothing) or with Moonpost's unsigned
            # relay CPU of this run.
            sign = ncpu * 1e6 / speed["rsa2048_multi"]
            s["bound_free_mta"] = sign / (sign + c["source"] + c["sink"])
            s["bound_unsigned_relay"] = sign / (sign + c["source"] + c["sink"] + c["moonpost"])
            # an MTA whose only cost is the system calls that move the mail
            # in and out (Moonpost's kernel time: no relay can skip them)
            s["bound_syscalls_only"] = sign / (sign + c["source"] + c["sink"] + c["moonpost_system"])
            s["target"] += "; the cores allow at most %.2f with an MTA that costs nothing (a signature %.0f us of a core, smtp-source and sink %.0f us), %.2f with one whose only cost is the kernel's share of relaying (%.0f us), %.2f with Moonpost's unsigned relay CPU (%.0f us)" % (
                s["bound_free_mta"], sign, c["source"] + c["sink"], s["bound_syscalls_only"], c["moonpost_system"],
                s["bound_unsigned_relay"], c["moonpost"])
    if name == "relay-r10":
        s["target"] = "reported: 10 recipients per message, %.0f recipients/s" % (10 * s["median"])
    if name == "relay-100k":
        s["target"] = "reported: 100 kB messages, %.0f MB/s" % (s["median"] * 0.1)
    if name == "relay-half" and "latency_p50_ms" in s:
        peak = figs.get("relay", {}).get("median")
        s["target"] = "250 to first attempt p50 <= 1 ms, p99 <= 5 ms at %.0f msg/s (%s of the relay peak): %.2f / %.2f ms" % (
            s["median"], ("%.2f" % (s["median"] / peak)) if peak else "?", s["latency_p50_ms"], s["latency_p99_ms"])
        s["met"] = s["latency_p50_ms"] <= 1 and s["latency_p99_ms"] <= 5
    if name == "relay-mp-tls" and figs.get("relay-mp-plain"):
        s["vs_plaintext"] = s["median"] / figs["relay-mp-plain"]["median"]
        s["target"] = "TLS relay / plaintext relay into the same sink: %.2f" % s["vs_plaintext"]
    res["figures"].append(s)
try:
    res["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
except Exception:
    res["commit"] = "?"
res["machine"] = "%s, %s cores" % (platform.platform(), __import__("os").cpu_count())
try:
    import re
    rec = open(out + "/recovery.txt").read()
    res["recovery"] = [{"label": m.group(1), "messages": int(m.group(2)), "seconds": float(m.group(3))}
                       for m in re.finditer(r"recovery \((.*?)\): (\d+) messages in ([\d.]+) s", rec)]
except OSError:
    pass
res["openssl_speed_signs_per_s"] = speed
try:
    import re as _rs
    sup = open(out + "/suppress.txt").read()
    m1 = _rs.search(r"suppress load: (\d+) entries in ([\d.]+) s", sup)
    m2 = _rs.search(r"suppress memory: ([\d.]+) octets/entry counted by the store .*?, ([\d.]+) octets/entry of RSS", sup)
    m3 = _rs.search(r"suppress lookup: (\d+) ns per hit, (\d+) ns per miss", sup)
    if m1 and m2 and m3:
        res["suppress"] = {"entries": int(m1.group(1)), "load_s": float(m1.group(2)),
                           "octets_per_entry": float(m2.group(1)), "rss_octets_per_entry": float(m2.group(2)),
                           "lookup_hit_ns": int(m3.group(1)), "lookup_miss_ns": int(m3.group(2))}
except OSError:
    pass
try:
    import re as _re
    eng = {}
    for m in _re.finditer(r"dkim-sign (\w+) (\d+): (\d+) jobs/s", open(out + "/dkim-sign.txt").read()):
        eng[m.group(1)] = float(m.group(3))
    res["dkim_signer_jobs_per_s"] = eng
except OSError:
    eng = {}
try:
    res["conns"] = json.load(open(out + "/conns.json"))
except (OSError, ValueError):
    pass
try:
    import re as _rm
    memtxt = open(out + "/memory.txt").read()
    res["queued_memory"] = [{"state": m.group(2), "messages": int(m.group(1)), "lua_heap_bytes": float(m.group(3)),
                             "rss_bytes": float(m.group(4))}
                            for m in _rm.finditer(r"(\d+) queued \((\w+)\): Lua heap ([\d.]+) bytes/message, "
                                                  r"RSS ([\d.]+) bytes/message", memtxt)]
    pk = _rm.search(r"during the pass of first attempts: Lua heap peak ([\d.]+) MiB, RSS peak ([\d.]+) MiB "
                    r"\(([\d.]+) bytes/message\)", memtxt)
    if pk:
        res["queued_memory_peak"] = {"lua_heap_mib": float(pk.group(1)), "rss_mib": float(pk.group(2)),
                                     "rss_bytes_per_message": float(pk.group(3))}
except OSError:
    pass
json.dump(res, open(out + "/latest.json", "w"), indent=2)
lines = ["| figure | msg/s median (min–max) | ratio to limit | peak RSS MiB | batch size | fsyncs/s | target | met |",
         "|---|---|---|---|---|---|---|---|",
         "| limit (smtp-source → smtp-sink) | %.0f (%.0f–%.0f) | 1.00 | – | – | – | – | – |" % (
             limit["median"], limit["min"], limit["max"])]
for s in res["figures"]:
    lines.append("| %s | %.0f (%.0f–%.0f) | %.2f | %s | %s | %s | %s | %s |" % (
        s["name"], s["median"], s["min"], s["max"], s["ratio"],
        "%.1f" % s["peak_rss_mib"] if s["peak_rss_mib"] else "–",
        "%.1f" % s["batch_size"] if "batch_size" in s else "–",
        "%.0f" % s["fsyncs_per_s"] if "fsyncs_per_s" in s else "–",
        s["target"] or "–", {True: "yes", False: "no", None: "–"}[s["met"]]))
if eng and speed:
    lines.append("")
    lines.append("| DKIM signer alone | jobs/s | openssl speed -multi signs/s | ratio |")
    lines.append("|---|---|---|---|")
    for k, sk in (("rsa", "rsa2048_multi"), ("ed25519", "ed25519_multi")):
        if k in eng and speed.get(sk):
            lines.append("| %s | %.0f | %.0f | %.2f |" % ("RSA-2048" if k == "rsa" else "Ed25519", eng[k], speed[sk],
                                                    eng[k] / speed[sk]))
scale = []
for q in res.get("queued_memory", []):
    scale.append("| %d messages queued, %s | %.0f bytes/message of Lua heap (%.0f of RSS) | < 300 bytes/message | %s |" % (
        q["messages"], {"recovered": "as recovered at start", "attempted": "each after its first attempt"}.get(
            q["state"], q["state"]), q["lua_heap_bytes"], q["rss_bytes"], "yes" if q["lua_heap_bytes"] < 300 else "no"))
pk = res.get("queued_memory_peak")
if pk and res.get("queued_memory"):
    scale.append("| the same queue, peak during its pass of first attempts (gc_headroom) | %.0f MiB RSS "
                 "(%.0f bytes/message), Lua heap %.0f MiB | reported | – |" % (
                     pk["rss_mib"], pk["rss_bytes_per_message"], pk["lua_heap_mib"]))
cn = res.get("conns")
if cn and cn.get("held"):
    gib = cn["rss_held_kib"] / 1048576.0
    g = cn.get("greeting_ms") or {}
    t = cn.get("targets") or {}
    want, gib_max, ms_max = t.get("sessions", 0), t.get("rss_gib", 0), t.get("greeting_ms", 0)
    if cn["held"] < want:
        met = "no (%d held)" % cn["held"]
    else:
        met = "yes" if gib < gib_max and g.get("max", 1e9) < ms_max else "no"
    scale.append("| %d idle sessions held %d s | %.2f GiB RSS (%d bytes/session); greeting median %.2f ms, max %.2f | "
                 "%d sessions, < %g GiB, greeting < %g ms | %s |" % (
                     cn["held"], cn["hold_s"], gib, cn["rss_bytes_per_session"], g.get("median", -1), g.get("max", -1),
                     want, gib_max, ms_max, met))
if scale:
    lines.append("")
    lines.append("| scale | measured | target | met |")
    lines.append("|---|---|---|---|")
    lines.extend(scale)
sup = res.get("suppress")
if sup:
    lines.append("")
    lines.append("| suppression store | entries | load s | octets/entry (store / RSS) | lookup ns (hit / miss) |")
    lines.append("|---|---|---|---|---|")
    lines.append("| moonpost.core.suppress | %d | %.2f | %.1f / %.1f | %d / %d |" % (
        sup["entries"], sup["load_s"], sup["octets_per_entry"], sup["rss_octets_per_entry"],
        sup["lookup_hit_ns"], sup["lookup_miss_ns"]))
withcpu = [s for s in res["figures"] if "cpu_us_per_msg" in s]
if withcpu:
    lines.append("")
    lines.append("| CPU per message (µs, medians) | Moonpost | of which in the kernel | smtp-source | sink | all %d cores busy would give msg/s (ratio to limit) | cores busy | read+write calls/msg Moonpost / sink |" % ncpu)
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in withcpu:
        c = s["cpu_us_per_msg"]
        if "cpu_ceiling" not in s:
            # accept-only and durable: Moonpost's figures only
            lines.append("| %s | %.0f | %.0f | – | – | – | – | – |" % (s["name"], c["moonpost"], c["moonpost_system"]))
            continue
        w = s.get("rw_calls_per_msg")
        lines.append("| %s | %.0f | %.0f | %.0f | %.0f | %.0f (%.2f) | %.0f%% | %s |" % (
            s["name"], c["moonpost"], c["moonpost_system"], c["source"], c["sink"], s["cpu_ceiling"],
            s["cpu_ceiling"] / limit["median"], 100 * s["cpu_busy"],
            "%.1f / %.1f" % (w["moonpost"], w["sink"]) if w else "–"))
md = "\n".join(lines)
open(out + "/latest.md", "w").write(md + "\n")
print("load: %s, %d runs each, commit %s" % (res["load"], limit["runs"], res["commit"]))
print(md)
PY
