#!/bin/bash
# Instructions per relayed message (make bench-instructions): the relay of
# scripts/bench/relay.py run twice under valgrind's callgrind, with SMALL and
# with SMALL + N messages; the difference over N is what one message costs
# Moonpost's process in user space, by shared object (the LuaJIT VM, code it
# compiled, libc, the C core, ...). Unlike a rate, the count does not depend
# on what else the machine is doing, so it shows what a change to the hot
# path saved. Kernel time (the sockets, fsync) is not counted: the CPU table
# of make bench gives that share.
#
# With TOP=n it also prints the n functions that cost the most per message
# (their own instructions, not their callees'). Debian's luajit has no
# symbols, so its functions are unnamed there; LUAJIT_BIN names a LuaJIT
# built with them (docs/install.md#make-bench-instructions), run with the
# module paths of the system's luajit.
#
# Knobs: N (3000), SMALL (100), C (20), SIZE (1000), PORT (4490),
# BENCH_POLICY (as relay.py: another relaying policy), TOP (0), LUAJIT_BIN
# (luajit).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
N=${N:-3000}
SMALL=${SMALL:-100}
C=${C:-20}
SIZE=${SIZE:-1000}
PORT=${PORT:-4490}
TOP=${TOP:-0}
LUAJIT_BIN=${LUAJIT_BIN:-luajit}
command -v valgrind >/dev/null || { echo "instructions: valgrind is not installed" >&2; exit 2; }
work=$(mktemp -d /tmp/moonpost-instr.XXXXXX)
trap 'rm -rf "$work"' EXIT
# (the system luajit's module paths, for a LuaJIT built elsewhere)
lua_path=$(luajit -e 'io.write(package.path)')
lua_cpath=$(luajit -e 'io.write(package.cpath)')
cat >"$work/luajit" <<SH
#!/bin/sh
LUA_PATH='$lua_path' LUA_CPATH='$lua_cpath' exec valgrind --tool=callgrind --smc-check=all-non-file \\
  --callgrind-out-file=$work/out.\$\$ '$LUAJIT_BIN' "\$@"
SH
chmod +x "$work/luajit"
for n in "$SMALL" "$((SMALL + N))"; do
  LUAJIT=$work/luajit /usr/bin/python3 scripts/bench/relay.py "$PORT" "$n" "$C" "$SIZE" >"$work/relay-$n.json"
  mv "$work"/out.* "$work/cg-$n"
done
/usr/bin/python3 - "$work/cg-$SMALL" "$work/cg-$((SMALL + N))" "$N" "$TOP" <<'PY'
import re, subprocess, sys
def by_function(path):
    out = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", path], capture_output=True, text=True).stdout
    fns = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
        if not m or "PROGRAM TOTALS" in m.group(2):
            continue
        # file:function [object] -> function [object's name]
        f = re.sub(r"^.*?([^/:\s]+:[^\s\[]+)", r"\1", m.group(2))
        f = re.sub(r"\[([^\]]*/)?([^\]/]*)\]\s*$", r"[\2]", f)
        f = re.sub(r"'\d+", "", f)  # recursion levels: one function
        fns[f] = fns.get(f, 0) + int(m.group(1).replace(",", ""))
    return fns
def by_object(path):
    out = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", path], capture_output=True, text=True).stdout
    total, objs = 0, {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
        if not m or m.group(2).startswith("=>"):
            continue
        n = int(m.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in m.group(2):
            total = n
            continue
        o = re.search(r"\[([^\]]*)\]\s*$", m.group(2))
        name = o.group(1).rsplit("/", 1)[-1] if o else "?"
        if name == "???":
            name = "code LuaJIT compiled"
        elif name == "?":
            name = "other (no object named)"
        objs[name] = objs.get(name, 0) + n
    return total, objs
(t0, a), (t1, b), n = by_object(sys.argv[1]), by_object(sys.argv[2]), int(sys.argv[3])
per = (t1 - t0) / n
print("instructions: %.0f per relayed message (callgrind, user space of the Moonpost process)" % per)
rows = sorted(((b.get(k, 0) - a.get(k, 0)) / n, k) for k in set(a) | set(b))
for v, k in reversed(rows):
    if v >= 0.01 * per:
        print("  %-34s %8.0f  %4.1f%%" % (k, v, 100 * v / per))
top = int(sys.argv[4])
if top > 0:
    a, b = by_function(sys.argv[1]), by_function(sys.argv[2])
    rows = sorted(((b.get(k, 0) - a.get(k, 0)) / n, k) for k in set(a) | set(b))
    print("the %d functions that cost the most per message (own instructions):" % top)
    for v, k in list(reversed(rows))[:top]:
        print("  %8.0f  %4.1f%%  %s" % (v, 100 * v / per, k[:90]))
PY
