#!/bin/sh
# make bench-peers: the same relay load through Postfix and Moonpost with the
# side-by-side harness in ../shared/peers (PEERS_DIR), then the ratios.
#
#   make bench-peers                       # N=20000 C=50 REPS=3, limit + postfix + moonpost
#   SOURCE_EXTRA=-d make bench-peers        # reuse connections (as make bench does); default: one per message
#   N=5000 REPS=1 make bench-peers
#   PEERS="postfix exim moonpost" make bench-peers
#
# The harness runs every peer in a private network namespace with only lo,
# one at a time, each stopped by PID; it needs root (see its README).
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS_DIR=${PEERS_DIR:-$ROOT/../shared/peers}
if [ ! -x "$PEERS_DIR/run.sh" ]; then
  echo "bench-peers: no peer harness at $PEERS_DIR (set PEERS_DIR to the shared/peers folder)" >&2
  exit 2
fi
OUT=${OUT:-$ROOT/var/bench/peers-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
# shellcheck disable=SC2086
MOONPOST_CHECKOUT=$ROOT N=${N:-20000} C=${C:-50} REPS=${REPS:-3} E2E_TIMEOUT=${E2E_TIMEOUT:-900} OUT=$OUT \
  "$PEERS_DIR/run.sh" ${PEERS:-limit postfix moonpost}
/usr/bin/python3 "$ROOT/scripts/bench/peers_ratio.py" "$OUT/results.jsonl" | tee "$OUT/ratios.md"
