#!/bin/bash
# Bytes of Lua heap allocated per relayed message: the relay of
# scripts/bench/relay.py with the Lua collector stopped in Moonpost, so that
# the heap only grows; its largest size over N messages is what they
# allocated (plus the start-up heap, ~1 MB). Like make bench-instructions,
# a figure the machine's noise does not move; the collector's cost follows
# it (docs/install.md, "Garbage per message").
#
# Knobs: N (20000), C (50), SIZE (1000), PORT (4850), BENCH_POLICY (the
# relaying policy, default examples/relay.lua).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
N=${N:-20000}
C=${C:-50}
SIZE=${SIZE:-1000}
PORT=${PORT:-4850}
policy=$(readlink -f "${BENCH_POLICY:-examples/relay.lua}")
work=$(mktemp -d /tmp/moonpost-alloc.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat >"$work/policy.lua" <<LUA
local uv = require "luv"
collectgarbage("stop")
local t = uv.new_timer()
t:unref()
t:start(200, 200, function()
  collectgarbage("stop") -- (a reload or a library may restart it)
  io.stderr:write(string.format("HEAP_KB %.0f\n", collectgarbage("count")))
end)
dofile("$policy")
LUA
out=$(BENCH_KEEP=1 BENCH_POLICY="$work/policy.lua" /usr/bin/python3 scripts/bench/relay.py "$PORT" "$N" "$C" "$SIZE" \
  2>"$work/relay.err")
kept=$(grep -o '/tmp/moonpost-bench-relay-[A-Za-z0-9_]*' "$work/relay.err" | head -1)
/usr/bin/python3 - "$kept" "$N" "$out" <<'PY'
import glob, json, sys
kept, n, r = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
kb = [int(l.split()[1]) for f in glob.glob(kept + "/*.log") for l in open(f) if l.startswith("HEAP_KB")]
if not kb or r.get("delivered") != n:
    sys.exit("alloc: no figure (delivered %s of %d)" % (r.get("delivered"), n))
print("alloc: %.0f bytes of Lua heap allocated per relayed message (%d messages, heap %d KB with the collector stopped)"
      % (max(kb) * 1024 / n, n, max(kb)))
PY
rm -rf "$kept"
