#!/bin/sh
# make test: every suite, then one line of totals, alone on the last line:
#   N passed, N failed
#
# Suites: lint (luacheck, one test per file), specs (busted, one test per
# `it`), fuzz (each target replays its regression inputs, then fuzzes for
# FUZZ_SMOKE seconds under ASan+UBSan; one test per target).
# TEST_LONG=1 (make test-long) adds the long fuzz run and specs tagged "long".
# SPEC=... limits busted to the given paths.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
out=$root/build/test
mkdir -p "$out"
passed=0
failed=0

count() { # file -> adds "ok"/"not ok" lines of a TAP stream
  p=$(grep -ac '^ok ' "$1" || true)
  f=$(grep -ac '^not ok ' "$1" || true)
  s=$(grep -ac '^ok .*# SKIP' "$1" || true)
  passed=$((passed + p - s))
  failed=$((failed + f))
  echo "  $2: $((p - s)) passed, $f failed${s:+, $s skipped (not counted)}" >&2
}

echo "== lint (luacheck)" >&2
luacheck --no-color --formatter TAP . >"$out/lint.tap" 2>&1
grep -av '^ok ' "$out/lint.tap" | grep -av '^1\.\.' >&2 || true
count "$out/lint.tap" lint

echo "== specs (busted)" >&2
tags=""
if [ -z "${TEST_LONG:-}" ]; then tags="--exclude-tags=long"; fi
# shellcheck disable=SC2086
busted -o TAP $tags ${SPEC:-} >"$out/specs.tap" 2>&1
status=$?
grep -av '^ok ' "$out/specs.tap" >&2 || true
count "$out/specs.tap" specs
if [ "$status" -ne 0 ] && ! grep -q '^not ok ' "$out/specs.tap"; then
  # busted failed before or around the tests (a load error): count it.
  echo "  specs: busted exited $status without a failing test" >&2
  failed=$((failed + 1))
fi

echo "== fuzz (libFuzzer, ASan+UBSan)" >&2
secs=${FUZZ_SMOKE:-20}
if [ -n "${TEST_LONG:-}" ]; then secs=${FUZZ_TIME:-600}; fi
if make -s fuzz-build >"$out/fuzz-build.log" 2>&1; then
  FUZZ_OUT=$out/fuzz scripts/fuzz.sh "$secs" build/fuzz/fuzz_smtp_in build/fuzz/fuzz_smtp_path build/fuzz/fuzz_smtp_reply \
    build/fuzz/fuzz_spool_scan build/fuzz/fuzz_dns_parse build/fuzz/fuzz_dkim_parse build/fuzz/fuzz_suppress_load \
    >"$out/fuzz.log" 2>&1
  cat "$out/fuzz.log" >&2
  p=$(grep -ac '^fuzz .*: ok' "$out/fuzz.log" || true)
  f=$(grep -ac '^fuzz .*: FAILED' "$out/fuzz.log" || true)
  passed=$((passed + p))
  failed=$((failed + f))
else
  cat "$out/fuzz-build.log" >&2
  echo "  fuzz: the fuzz targets did not build" >&2
  failed=$((failed + 1))
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
