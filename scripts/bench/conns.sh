#!/bin/bash
# Idle sessions (issue 8 item 4): K connections held after EHLO against one
# Moonpost process (scripts/bench/conns.lua), opened by the shared peers'
# bounded probe (../shared/peers/conns.py, several client processes), with
# Moonpost's RSS before and while they are held, and a new session's time
# to its greeting meanwhile. One process is capped by the machine's
# descriptor limit (20000 here), so K stays under it; past that, workers.
#
# Knobs: K (18000), HOLD (10 s), PORT (3725).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# shellcheck source=scripts/bench/lib.sh
. "$root/scripts/bench/lib.sh"
K=${K:-18000}
HOLD=${HOLD:-10}
PORT=${PORT:-3725}
probe=${PEERS_DIR:-$root/../shared/peers}/conns.py
[ -f "$probe" ] || { echo "conns: no $probe (set PEERS_DIR)" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)"
log=$(mktemp /tmp/moonpost-conns-log.XXXXXX)
MOONPOST_LISTEN=127.0.0.1:$PORT MOONPOST_HTTP= scripts/moonpost run scripts/bench/conns.lua 2>"$log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
wait_port "$PORT"
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$pid/status"; }
idle=$(rss)
/usr/bin/python3 "$probe" --port "$PORT" -k "$K" --hold "$HOLD" --json /tmp/moonpost-conns-$$.json >/dev/null 2>&1 &
probe_pid=$!
peak=$idle greet=
while kill -0 "$probe_pid" 2>/dev/null; do
  r=$(rss)
  [ "$r" -gt "$peak" ] && peak=$r
  if [ -z "$greet" ] && [ "$r" -gt $((idle + K * 3)) ]; then
    # most sessions are open: time a new one to its 220
    greet=$(/usr/bin/python3 -c "
import socket, time
t = time.time(); s = socket.create_connection(('127.0.0.1', $PORT), 5); s.recv(512)
print('%.2f' % ((time.time() - t) * 1000)); s.close()")
  fi
  sleep 0.2
done
held=$(/usr/bin/python3 -c "import json; print(json.load(open('/tmp/moonpost-conns-$$.json')).get('held', 0))")
rm -f "/tmp/moonpost-conns-$$.json"
# the Lua heap: at the start, and at the most sessions
lua=$(awk '/^lua heap/ { if (!first) first = $3; if ($5 >= s) { s = $5; kib = $3 } } END { print first + 0, kib + 0, s + 0 }' "$log")
read -r lua0 lua1 luas <<<"$lua"
echo "conns: $held sessions held after EHLO; Moonpost RSS idle $((idle / 1024)) MiB, held $((peak / 1024)) MiB:" \
  "$(( (peak - idle) * 1024 / (held > 0 ? held : 1) )) bytes per session, of which Lua heap" \
  "$(( (lua1 - lua0) * 1024 / (luas > 0 ? luas : 1) )) bytes; a new session's greeting while held: ${greet:-?} ms"
