#!/usr/bin/python3
"""A programmable SMTP sink for the specs, on Debian's python3-aiosmtpd.

    sink.py --port 0 --events FILE [--host ADDR] [--no-pipelining] [--size N] [--dsn]
            [--no-smtputf8] [--no-8bitmime] [--no-ehlo]
            [--tls CERT KEY [--implicit]] [--bad-tls]

--tls offers STARTTLS with that certificate (--implicit: TLS from the first
byte instead); --bad-tls offers STARTTLS, answers 220 and then sends bytes
that are no TLS handshake. Message events carry "tls": the protocol version
of the connection, or null.

Prints "port N" on stdout once it listens, then writes one JSON object per
line to FILE for every connection, transaction and reply decision:

    {"ev": "connect", "conn": 3, "open": 2}           open = concurrent connections
    {"ev": "message", "conn": 3, "n": 2, "from": ..., "rcpts": [...],
     "pipelined": true, "next_pipelined": false, "data": "...", "mail_params": [...],
     "rcpt_params": {...}}
    {"ev": "close", "conn": 3}

What it answers depends on each recipient's local part:

    r451-*         RCPT 451 4.2.0          r550-*    RCPT 550 5.1.1
    d452-*         DATA end 452 4.3.1      d554-*    DATA end 554 5.6.0
    flaky<N>-*     RCPT 451 the first N times this address is tried, then 250
    dropdata-*     the connection is closed after the data, without a reply
    throttle-*     RCPT 451 4.7.0 [TSS04] ... deferred due to unexpected volume (Yahoo's text)
    garbage-*      RCPT answered with bytes that are not an SMTP reply
    stall-*        RCPT never answered (the connection stays open)
    slow<MS>-*     RCPT answered 250 after MS milliseconds
    dslow<MS>-*    DATA end answered after MS milliseconds, the first time only
    dropdata<N>-*, garbage<N>-*, stall<N>-*, throttle<N>-*: only the first N times, then 250
    anything else  250

and a sender whose local part starts with m550- gets MAIL 550 5.1.1 (a
sender address the server refuses).

"pipelined": more commands were buffered behind MAIL; "next_pipelined": more
input (the next transaction) was buffered behind the end of this message's
data when it was read (RFC 2920 3.1).

Every event has "t", the time it happened.
"""
import argparse
import asyncio
import json
import re
import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


class State:
    def __init__(self, events, pipelining, size, dsn, smtputf8=True, eightbit=True, ehlo=True, bad_tls=False):
        self.bad_tls = bad_tls
        self.events = open(events, "a", buffering=1)
        self.pipelining = pipelining
        self.size = size
        self.dsn = dsn
        self.smtputf8 = smtputf8
        self.eightbit = eightbit
        self.ehlo = ehlo
        self.conn_seq = 0
        self.open = 0
        self.tries = {}

    def log(self, **ev):
        ev["t"] = time.time()
        self.events.write(json.dumps(ev) + "\n")

    def fault(self, local, name):
        """Does the fault `name` apply to this try of this recipient?"""
        m = re.match(name + r"(\d*)-", local)
        if not m:
            return False
        if m.group(1) == "":
            return True
        key = (name, local)
        n = self.tries.get(key, 0) + 1
        self.tries[key] = n
        return n <= int(m.group(1))


class SinkSMTP(SMTP):
    def _getparams(self, params):
        # aiosmtpd takes BODY= only when it does not decode the data; this
        # sink decodes it (as UTF-8) and announces 8BITMIME: take BODY too
        result = super()._getparams(params)
        if result is not None and self._decode_data and result.get("BODY") in ("7BIT", "8BITMIME"):
            del result["BODY"]
        return result

    def connection_made(self, transport):
        st = self.event_handler.state
        st.conn_seq += 1
        st.open += 1
        self.conn_id = st.conn_seq
        self.messages = 0
        peer = transport.get_extra_info("peername")
        st.log(ev="connect", conn=self.conn_id, open=st.open, peer=peer[0] if peer else None)
        super().connection_made(transport)

    def connection_lost(self, error):
        st = self.event_handler.state
        st.open -= 1
        st.log(ev="close", conn=self.conn_id)
        super().connection_lost(error)

    def _pending_input(self):
        reader = getattr(self, "_reader", None)
        return bool(reader is not None and len(getattr(reader, "_buffer", b"")) > 0)

    async def smtp_EHLO(self, hostname):
        st = self.event_handler.state
        if not st.ehlo:
            st.log(ev="ehlo_refused", conn=self.conn_id)
            await self.push("502 5.5.1 EHLO not implemented")
            return
        await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname):
        self.event_handler.state.log(ev="helo", conn=self.conn_id, name=hostname)
        await super().smtp_HELO(hostname)

    async def smtp_STARTTLS(self, arg):
        st = self.event_handler.state
        if st.bad_tls:
            st.log(ev="bad_tls", conn=self.conn_id)
            await self.push("220 2.0.0 Ready to start TLS")
            self.transport.write(b"this is not a TLS handshake\r\n" * 4)
            self.transport.close()
            return
        st.log(ev="starttls", conn=self.conn_id)
        await super().smtp_STARTTLS(arg)

    async def smtp_MAIL(self, arg):
        # MAIL arrived with more commands already buffered: pipelined
        self._pipelined = self._pending_input()
        await super().smtp_MAIL(arg)


class Handler:
    def __init__(self, state):
        self.state = state

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.state.log(ev="ehlo", conn=server.conn_id, name=hostname)
        out = [r for r in responses if "PIPELINING" not in r and "SIZE" not in r and "SMTPUTF8" not in r
               and "8BITMIME" not in r]
        last = out.pop()  # "250 HELP" or similar
        if self.state.pipelining:
            out.append("250-PIPELINING")
        if self.state.size:
            out.append("250-SIZE %d" % self.state.size)
        if self.state.dsn:
            out.append("250-DSN")
        out.append("250-ENHANCEDSTATUSCODES")
        if self.state.smtputf8:
            out.append("250-SMTPUTF8")
        if self.state.eightbit:
            out.append("250-8BITMIME")
        if self.state.bad_tls:
            out.append("250-STARTTLS")
        out.append(last.replace("250-", "250 "))
        return out

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address.split("@")[0].lower().startswith("m550-"):
            return "550 5.1.1 <%s>: Sender address rejected: not owned by user" % address
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.rcpt_params = {}
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        st = self.state
        if local.startswith("r451-"):
            return "451 4.2.0 try again later"
        if local.startswith("r550-"):
            return "550 5.1.1 no such user here"
        m = re.match(r"flaky(\d+)-", local)
        if m:
            n = st.tries.get(address, 0) + 1
            st.tries[address] = n
            if n <= int(m.group(1)):
                return "451 4.2.0 flaky: attempt %d" % n
        if st.fault(local, "throttle"):
            st.log(ev="throttled", conn=server.conn_id, rcpt=address)
            return ("451 4.7.0 [TSS04] Messages from %s temporarily deferred due to unexpected volume"
                    " or user complaints" % (session.peer[0] if session.peer else "?"))
        if st.fault(local, "garbage"):
            st.log(ev="garbage", conn=server.conn_id, rcpt=address)
            server.transport.write(b"this is not an SMTP reply\r\n")
            return "250 2.1.5 OK"
        if st.fault(local, "stall"):
            st.log(ev="stall", conn=server.conn_id, rcpt=address)
            await asyncio.sleep(3600)
        m = re.match(r"slow(\d+)-", local)
        if m:
            await asyncio.sleep(int(m.group(1)) / 1000)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_params[address] = rcpt_options
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        st = self.state
        server.messages += 1
        locals_ = [a.split("@")[0].lower() for a in envelope.rcpt_tos]
        if any(st.fault(l, "dropdata") for l in locals_):
            st.log(ev="dropped", conn=server.conn_id, rcpts=envelope.rcpt_tos)
            server.transport.abort()
            return "451 4.3.0 never sent"
        for l in locals_:
            m = re.match(r"dslow(\d+)-", l)
            if m and ("dslow", l) not in st.tries:
                st.tries[("dslow", l)] = 1
                await asyncio.sleep(int(m.group(1)) / 1000)
        outcome, reply = "accepted", "250 2.0.0 OK queued"
        if any(l.startswith("d452-") for l in locals_):
            outcome, reply = "452", "452 4.3.1 insufficient storage"
        if any(l.startswith("d554-") for l in locals_):
            outcome, reply = "554", "554 5.6.0 content rejected"
        data = envelope.content.decode("utf-8", "replace") if isinstance(envelope.content, bytes) \
            else envelope.content
        sslobj = server.transport.get_extra_info("ssl_object") if server.transport else None
        st.log(ev="message", outcome=outcome, conn=server.conn_id, n=server.messages,
               tls=sslobj.version() if sslobj else None,
               pipelined=getattr(server, "_pipelined", False), next_pipelined=server._pending_input(),
               mail_params=envelope.mail_options,
               rcpt_params=envelope.rcpt_params, data=data,
               **{"from": envelope.mail_from, "rcpts": envelope.rcpt_tos})
        return reply


class SinkController(Controller):
    starttls_context = None

    def factory(self):
        return SinkSMTP(self.handler, hostname="sink.test", decode_data=True,
                        enable_SMTPUTF8=self.handler.state.smtputf8, tls_context=self.starttls_context)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--events", required=True)
    ap.add_argument("--no-pipelining", action="store_true")
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--dsn", action="store_true")
    ap.add_argument("--no-smtputf8", action="store_true")
    ap.add_argument("--no-8bitmime", action="store_true")
    ap.add_argument("--no-ehlo", action="store_true")
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    ap.add_argument("--implicit", action="store_true")
    ap.add_argument("--bad-tls", action="store_true")
    a = ap.parse_args()
    state = Handler(State(a.events, not a.no_pipelining, a.size, a.dsn, not a.no_smtputf8, not a.no_8bitmime,
                          not a.no_ehlo, a.bad_tls))
    ctx = None
    if a.tls:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.tls[0], a.tls[1])
    port = a.port
    if port == 0:
        import socket
        s = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET)
        s.bind((a.host, 0))
        port = s.getsockname()[1]
        s.close()
    if ctx is not None and a.implicit:
        ctl = SinkController(state, hostname=a.host, port=port, ssl_context=ctx)
    else:
        SinkController.starttls_context = ctx
        ctl = SinkController(state, hostname=a.host, port=port)
    ctl.start()
    print("port %d" % port, flush=True)
    try:
        sys.stdin.read()  # run until the spec closes our stdin
    finally:
        ctl.stop()


if __name__ == "__main__":
    main()
