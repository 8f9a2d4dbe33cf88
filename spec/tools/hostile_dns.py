#!/usr/bin/python3
"""A DNS server on loopback that answers what the spec tells it to, for
hostile or broken answers a real server will not give (spec/helpers.lua:
H.hostile_dns).

    hostile_dns.py --script script.json --events events.json

script.json maps "<name> <TYPE>" (lower case, no final dot) to a rule:

    {"answer": ["<zone line>", ...], "authority": [...], "additional": [...],
     "rcode": "NOERROR" | "NXDOMAIN" | "SERVFAIL" | ...,
     "tc": true        -- over UDP: TC=1 and no records (the full answer over TCP),
     "drop": true      -- never answer (UDP and TCP),
     "delay": seconds  -- answer late,
     "wrong_id": true  -- over UDP: first an answer with another ID (and a bogus record),
     "raw_hex": "..."  -- these bytes after the query's ID, instead of an answer}

A name without a rule gets NXDOMAIN (with an SOA for "test."). Each query is
logged to events.json as {"name", "type", "proto"}. Prints "port N" once
ready on UDP and TCP 127.0.0.1:N.
"""
import argparse
import json
import socket
import struct
import sys
import threading
import time

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.flags

p = argparse.ArgumentParser()
p.add_argument("--script", required=True)
p.add_argument("--events", required=True)
p.add_argument("--port", type=int, default=0)
args = p.parse_args()

with open(args.script) as f:
    SCRIPT = json.load(f)

lock = threading.Lock()


def log(name, qtype, proto):
    with lock:
        with open(args.events, "a") as f:
            f.write(json.dumps({"name": name, "type": qtype, "proto": proto}) + "\n")


def rrsets(lines, origin="test."):
    out = []
    for line in lines:
        parts = line.split()
        name, ttl, cls, rtype = parts[0], int(parts[1]), parts[2], parts[3]
        data = " ".join(parts[4:])
        out.append(dns.rrset.from_text(name, ttl, cls, rtype, data))
    return out


SOA = "test. 60 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60"


def answer(wire, proto):
    """-> list of (delay, bytes) to send, or [] to say nothing"""
    try:
        q = dns.message.from_wire(wire)
    except Exception:
        return []
    if not q.question:
        return []
    qn = q.question[0].name.to_text().rstrip(".").lower()
    qt = dns.rdatatype.to_text(q.question[0].rdtype)
    log(qn, qt, proto)
    rule = SCRIPT.get(qn + " " + qt)
    if rule is None:
        r = dns.message.make_response(q)
        r.set_rcode(dns.rcode.NXDOMAIN)
        r.authority = rrsets([SOA])
        return [(0, r.to_wire())]
    if rule.get("drop"):
        return []
    delay = rule.get("delay", 0)
    if "raw_hex" in rule:
        return [(delay, wire[:2] + bytes.fromhex(rule["raw_hex"]))]
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.from_text(rule.get("rcode", "NOERROR")))
    sends = []
    if proto == "udp" and rule.get("wrong_id"):
        bogus = dns.message.make_response(q)
        bogus.id = (q.id + 1) & 0xFFFF
        bogus.answer = rrsets(rule.get("bogus", []))
        sends.append((0, bogus.to_wire()))
    if proto == "udp" and rule.get("tc"):
        r.flags |= dns.flags.TC
        sends.append((delay, r.to_wire()))
        return sends
    r.answer = rrsets(rule.get("answer", []))
    r.authority = rrsets(rule.get("authority", []))
    r.additional = rrsets(rule.get("additional", []))
    sends.append((delay, r.to_wire(max_size=65535)))
    return sends


def udp_loop(s):
    while True:
        wire, peer = s.recvfrom(65535)

        def reply(wire=wire, peer=peer):
            for delay, data in answer(wire, "udp"):
                if delay:
                    time.sleep(delay)
                s.sendto(data, peer)
        threading.Thread(target=reply, daemon=True).start()


def tcp_client(c):
    try:
        while True:
            head = c.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            n = struct.unpack("!H", head)[0]
            wire = c.recv(n, socket.MSG_WAITALL)
            for delay, data in answer(wire, "tcp"):
                if delay:
                    time.sleep(delay)
                c.sendall(struct.pack("!H", len(data)) + data)
    except OSError:
        pass
    finally:
        c.close()


def tcp_loop(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=tcp_client, args=(c,), daemon=True).start()


def bind_both(port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", port))
    port = u.getsockname()[1]
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("127.0.0.1", port))
    t.listen(16)
    return u, t, port


for _ in range(50):
    try:
        u, t, port = bind_both(args.port)
        break
    except OSError:
        continue
else:
    sys.exit("cannot bind")

threading.Thread(target=udp_loop, args=(u,), daemon=True).start()
threading.Thread(target=tcp_loop, args=(t,), daemon=True).start()
print("port %d" % port, flush=True)
# until stdin closes
sys.stdin.read()
