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
    """Follows the sink's message counter. It writes one for every message;
    read as it comes, that would wake this process thousands of times a
    second, taking CPU from the programs measured. A pause after each read
    lets the pipe collect them (a few kB at most between reads: the sink
    never blocks) and costs the end-to-end time at most 10 ms."""
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
        time.sleep(0.01)


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


def proc_sum(path, keys):
    """The sum of the fields named keys in a /proc file of "key: value" lines
    (0 when the process is gone)."""
    total = 0
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(keys):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total


def measure(*tops):
    """For each of tops, a process and its live descendants (worker
    processes), from one walk of /proc: CPU seconds (user + system, and
    system alone), read and write system calls (read, readv, pread, write,
    writev, pwrite: syscr + syscw of /proc/pid/io) and the summed peak RSS
    (each process's VmHWM, KiB)."""
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
    hz = os.sysconf("SC_CLK_TCK")
    out = {top: {"cpu": 0.0, "sys": 0.0, "rw": 0, "hwm": 0} for top in tops}
    for pid, fs in fields.items():
        p = pid
        while p and p not in out:
            p = parent.get(p)
        if p in out:
            m = out[p]
            m["cpu"] += (int(fs[11]) + int(fs[12])) / hz
            m["sys"] += int(fs[12]) / hz
            m["rw"] += proc_sum("/proc/%d/io" % pid, ("syscr:", "syscw:"))
            m["hwm"] += proc_sum("/proc/%d/status" % pid, ("VmHWM:",))
    return [out[top] for top in tops]


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


mp0, sink0 = measure(mp.pid, sink.pid)
source0 = children_cpu_s()
self0 = resource.getrusage(resource.RUSAGE_SELF)
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
mp1, sink1 = measure(mp.pid, sink.pid)
self1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = {"moonpost": mp1["cpu"] - mp0["cpu"], "source": children_cpu_s() - source0,
       "sink": sink1["cpu"] - sink0["cpu"], "moonpost_system": mp1["sys"] - mp0["sys"],
       # this script (following the sink's counter), for the record
       "harness": self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime}
rw = {"moonpost": mp1["rw"] - mp0["rw"], "sink": sink1["rw"] - sink0["rw"]}
rss = mp1["hwm"]
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
