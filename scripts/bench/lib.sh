# Shell functions the benchmark drivers share (sourced by run.sh and workers.sh).

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
