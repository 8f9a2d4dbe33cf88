#!/bin/sh
# Run each fuzz target for SECONDS seconds (make fuzz; make test runs it
# briefly). Regression inputs (core/fuzz/regress/<target>/) are replayed
# first; seeds come from core/fuzz/corpus/<target>/, and the growing corpus
# lives in $FUZZ_OUT/corpus/<target>/ (FUZZ_OUT defaults to build/fuzz). A
# finding is written to $FUZZ_OUT/findings/ and makes the script fail.
# Prints one line per target:
#   fuzz <target>: ok (<runs> runs in <s> s)  |  fuzz <target>: FAILED
set -u
secs=${1:-60}
shift
status=0
root=$(cd "$(dirname "$0")/.." && pwd)
fout=${FUZZ_OUT:-$root/build/fuzz}
mkdir -p "$fout/findings"
for bin in "$@"; do
  name=$(basename "$bin")
  target=${name#fuzz_}
  corpus="$fout/corpus/$target"
  mkdir -p "$corpus"
  log="$fout/$name.log"
  ok=1
  if [ -d "$root/core/fuzz/regress/$target" ]; then
    if ! "$bin" "$root/core/fuzz/regress/$target"/* >"$log.regress" 2>&1; then ok=0; fi
  fi
  if [ $ok = 1 ]; then
    if ! "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$fout/findings/$target-" \
        "$corpus" "$root/core/fuzz/corpus/$target" >"$log" 2>&1; then ok=0; fi
  fi
  if [ $ok = 1 ]; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
    echo "fuzz $target: ok (${runs:-?} runs in ${secs} s)"
  else
    echo "fuzz $target: FAILED (see $log and $fout/findings/)"
    tail -n 30 "$log" "$log.regress" 2>/dev/null | sed 's/^/  /'
    status=1
  fi
done
exit $status
