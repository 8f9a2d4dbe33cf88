#!/usr/bin/python3
"""End-to-end relay figure for `make bench`:

    relay.py PORT_BASE N C SIZE [extra smtp-source args...]

smtp-sink (-c, counting) on PORT_BASE+2; Moonpost's examples/relay.lua on
PORT_BASE+1 relaying to it (durable spool in a temporary directory);
smtp-source -d -s C -m N -l SIZE into Moonpost. Prints one JSON line:
{"inject_s", "e2e_s", "delivered", "rss_kib", "cpu_us_per_msg", "latency_p50_ms",
"latency_p99_ms", "rw_calls_per_msg"}. rss_kib is the peak RSS of Moonpost, summed over its
processes (with workers, the supervisor's and every worker's). cpu_us_per_msg gives the user + system CPU time per
message, from the first connection to the last delivery, of Moonpost (all its
processes: with workers, the supervisor and every worker), smtp-source and
the sink: {"moonpost", "source", "sink"}, and the part of Moonpost's in the
kernel ("moonpost_system"). Their sum over the machine's cores
is the rate the machine could reach with every core busy. rw_calls_per_msg
counts the read and write system calls (socket and file, /proc/pid/io
syscr + syscw) per message of Moonpost and of the sink: a figure the
machine's speed does not move.

Environment:
  BENCH_POLICY   the relaying policy instead of examples/relay.lua (it gets
                 MOONPOST_LISTEN, MOONPOST_RELAY, MOONPOST_SPOOL and the rest
                 of this environment)
  BENCH_KEEP     set: keep the temporary directory (Moonpost's log, the
                 spool) and print its name on stderr
  BENCH_SINK     "smtp-sink" (default) or "moonpost": scripts/bench/sink.lua,
                 offering STARTTLS when BENCH_SINK_CERT and BENCH_SINK_KEY are set
"""
import json, os, re, resource, shutil, signal, subprocess, sys, tempfile, threading, time

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
base, n, c, size = (int(x) for x in sys.argv[1:5])
extra = sys.argv[5:]
mp_port, sink_port = base + 1, base + 2
tmp = tempfile.mkdtemp(prefix="moonpost-bench-relay-")

count, t_done = 0, None
lock = threading.Lock()


def read_sink(proc):
    global count, t_done
    rx = re.compile(rb"mesg=(\d+)")
    buf = b""
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            return
        buf = (buf + chunk)[-256:]
        m = None
        for m in rx.finditer(buf):
            pass
        if m:
            with lock:
                count = max(count, int(m.group(1)))
                if t_done is None and count >= n:
                    t_done = time.monotonic()


def wait_port(port, limit=15):
    import socket
    end = time.time() + limit
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("nothing listens on %d" % port)


if os.environ.get("BENCH_SINK", "smtp-sink") == "moonpost":
    senv = dict(os.environ, MOONPOST_LISTEN="127.0.0.1:%d" % sink_port)
    if os.environ.get("BENCH_SINK_CERT"):
        senv["MOONPOST_TLS_CERT"] = os.environ["BENCH_SINK_CERT"]
        senv["MOONPOST_TLS_KEY"] = os.environ["BENCH_SINK_KEY"]
    sink = subprocess.Popen([os.path.join(root, "scripts/moonpost"), "run", os.path.join(root, "scripts/bench/sink.lua")],
                            env=senv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
else:
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", "-m", "1000", "127.0.0.1:%d" % sink_port, "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
threading.Thread(target=read_sink, args=(sink,), daemon=True).start()
wait_port(sink_port)
log = open(os.path.join(tmp, "moonpost.log"), "w")
env = dict(os.environ, MOONPOST_LISTEN="127.0.0.1:%d" % mp_port, MOONPOST_RELAY="127.0.0.1:%d" % sink_port,
           MOONPOST_SPOOL=os.path.join(tmp, "spool"))
policy = os.environ.get("BENCH_POLICY") or os.path.join(root, "examples/relay.lua")
mp = subprocess.Popen([os.path.join(root, "scripts/moonpost"), "run", policy],
                      env=env, stdout=log, stderr=log)
wait_port(mp_port)


def tree_stats(top):
    """pid -> /proc/pid/stat fields (after the name) of a process and its
    live descendants."""
    parent, fields = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fs = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(name)] = int(fs[1])
        fields[int(name)] = fs
    out = {}
    for pid, fs in fields.items():
        p = pid
        while p and p != top:
            p = parent.get(p)
        if p == top:
            out[pid] = fs
    return out


def tree_cpu_s(top, which=(11, 12)):
    """CPU seconds of a process and its live descendants: user + system, or
    with which=(12,) system only."""
    total = sum(sum(int(fs[i]) for i in which) for fs in tree_stats(top).values())
    return total / os.sysconf("SC_CLK_TCK")


def tree_hwm_kib(top):
    """Peak RSS of a process and its live descendants (worker processes),
    summed: each process's VmHWM."""
    total = 0
    for pid in tree_stats(top):
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def tree_rw_calls(top):
    """Read and write system calls (read, readv, pread, write, writev, pwrite:
    syscr + syscw of /proc/pid/io) of a process and its live descendants."""
    total = 0
    for pid in tree_stats(top):
        try:
            with open("/proc/%d/io" % pid) as f:
                for line in f:
                    if line.startswith(("syscr:", "syscw:")):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


cpu0 = (tree_cpu_s(mp.pid), children_cpu_s(), tree_cpu_s(sink.pid), tree_cpu_s(mp.pid, (12,)))
rw0 = (tree_rw_calls(mp.pid), tree_rw_calls(sink.pid))
t0 = time.monotonic()
subprocess.run(["smtp-source", "-d", "-s", str(c), "-m", str(n), "-l", str(size), "-f", "bench@source.test",
                "-t", "sink@sink.test"] + extra + ["127.0.0.1:%d" % mp_port], stdout=subprocess.DEVNULL, timeout=900)
t_inject = time.monotonic() - t0
end = time.monotonic() + 300
while time.monotonic() < end:
    with lock:
        if t_done is not None:
            break
    time.sleep(0.05)
cpu = {"moonpost": tree_cpu_s(mp.pid) - cpu0[0], "source": children_cpu_s() - cpu0[1],
       "sink": tree_cpu_s(sink.pid) - cpu0[2], "moonpost_system": tree_cpu_s(mp.pid, (12,)) - cpu0[3]}
rw = {"moonpost": tree_rw_calls(mp.pid) - rw0[0], "sink": tree_rw_calls(sink.pid) - rw0[1]}
rss = tree_hwm_kib(mp.pid)
mp.send_signal(signal.SIGTERM)
mp.wait(timeout=60)
sink.send_signal(signal.SIGTERM)
sink.wait(timeout=10)
log.close()
text = open(os.path.join(tmp, "moonpost.log")).read()
lat = re.search(r"first attempt: p50 ([\d.]+) ms, p99 ([\d.]+) ms", text)
if os.environ.get("BENCH_KEEP"):
    sys.stderr.write(tmp + "\n")
else:
    shutil.rmtree(tmp, ignore_errors=True)
print(json.dumps({"n": n, "inject_s": t_inject, "e2e_s": (t_done - t0) if t_done else None, "delivered": count,
                  "rss_kib": rss, "cpu_us_per_msg": {k: round(v * 1e6 / n, 1) for k, v in cpu.items()},
                  "rw_calls_per_msg": {k: round(v / n, 2) for k, v in rw.items()},
                  "latency_p50_ms": float(lat.group(1)) if lat else None,
                  "latency_p99_ms": float(lat.group(2)) if lat else None}))
