#!/usr/bin/python3
"""A webhook receiver for the event log specs, on the standard http.server.

    webhook.py --out FILE [--host ADDR] [--port N] [--fail N] [--fail-status CODE] [--retry-after SECONDS]
               [--delay SECONDS]

Prints "port N" on stdout once it listens, then for every POST whose body
is a JSON array writes one line per element to FILE (json.dumps with sorted
keys) and answers 200 with a JSON body {"received": n}. Also appends one
line per request to FILE.requests: {"t", "n", "path", "content_type",
"events_header", "keepalive"}.

--fail N answers the first N requests with 503 (or --fail-status; only
their time is recorded, in FILE.failed), so a spec sees the sender retry;
with --retry-after, those answers carry Retry-After: SECONDS (--retry-after-date SECONDS: as
an HTTP-date that many seconds ahead). --delay waits that long between recording a
batch and answering (a spec kills the sender in between). A body that is not a JSON array of objects gets
400 and a line {"error": ...} in FILE.requests.

HTTP/1.1 with keep-alive. Runs until its stdin is closed (or it is killed).
"""
import argparse
import json
import sys
import threading
import email.utils
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class State:
    def __init__(self, out, fail, delay=0.0, fail_status=503, retry_after=None, retry_after_date=None):
        self.delay = delay
        self.retry_after = retry_after
        self.retry_after_date = retry_after_date
        self.failed = open(out + ".failed", "a", buffering=1)
        self.fail_status = fail_status
        self.lock = threading.Lock()
        self.out = open(out, "a", buffering=1)
        self.requests = open(out + ".requests", "a", buffering=1)
        self.fail = fail
        self.seen = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def answer(self, code, obj, extra=None):
        body = json.dumps(obj).encode()
        self.send_response(code)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        st = self.server.state
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        with st.lock:
            st.seen += 1
            if st.seen <= st.fail:
                st.failed.write(json.dumps({"t": time.time(), "status": st.fail_status}) + "\n")
                extra = None
                if st.retry_after is not None:
                    extra = {"Retry-After": str(st.retry_after)}
                elif st.retry_after_date is not None:
                    # an HTTP-date (IMF-fixdate) that many seconds ahead
                    extra = {"Retry-After": email.utils.formatdate(time.time() + st.retry_after_date, usegmt=True)}
                self.answer(st.fail_status, {"error": "failing on purpose"}, extra)
                return
            try:
                events = json.loads(raw.decode("utf-8"))
                if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
                    raise ValueError("not a JSON array of objects")
            except Exception as e:  # noqa: BLE001 - any bad body is a 400
                st.requests.write(json.dumps({"t": time.time(), "error": str(e)}) + "\n")
                self.answer(400, {"error": str(e)})
                return
            for ev in events:
                st.out.write(json.dumps(ev, sort_keys=True, ensure_ascii=False) + "\n")
            st.requests.write(json.dumps({
                "t": time.time(), "n": len(events), "path": self.path,
                "content_type": self.headers.get("Content-Type"),
                "events_header": self.headers.get("X-Moonpost-Events"),
                "authorization": self.headers.get("Authorization"),
                "keepalive": self.headers.get("Connection", "") != "close",
            }) + "\n")
        if st.delay:
            time.sleep(st.delay)
        self.answer(200, {"received": len(events)})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # a client that hung up before the answer (Moonpost stopping in the
        # middle of a POST: it sends that batch again) is no error here
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fail", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--fail-status", type=int, default=503)
    ap.add_argument("--retry-after", type=int, default=None)
    ap.add_argument("--retry-after-date", type=int, default=None)
    args = ap.parse_args()
    server = Server((args.host, args.port), Handler)
    server.state = State(args.out, args.fail, args.delay, args.fail_status, args.retry_after, args.retry_after_date)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("port %d" % server.server_address[1], flush=True)
    sys.stdin.read()  # run until the spec closes our stdin
    server.shutdown()


if __name__ == "__main__":
    main()
