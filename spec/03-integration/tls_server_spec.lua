-- Inbound TLS: STARTTLS (RFC 3207) and implicit TLS (RFC 8314) listeners,
-- checked with real clients (openssl s_client, swaks, Python's smtplib and
-- ssl) and with Moonpost's own TLS client.
local H = require "helpers"

local PY = H.python

local function tls_opts(extra)
  local d = H.certs()
  local t = { cert = d .. "/mx.pem", key = d .. "/mx.key" }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- An MTA that records every message it receives (no spool).
local function start(accept_extra, new_opts)
  local got = {}
  local o = { tls = tls_opts() }
  for k, v in pairs(accept_extra or {}) do o[k] = v end
  local mta, port = H.start_mta(o, function(mta)
    mta:on("smtp_server_message_received", function(txn, msg)
      got[#got + 1] = { txn = txn, text = msg:tostring(), tls = txn.conn.tls_info }
    end)
  end, new_opts)
  return mta, port, got
end

local function s_client(args, stdin)
  return H.exec("openssl", args, { stdin = stdin or "QUIT\n", timeout = 20 })
end

describe("inbound STARTTLS", function()
  it("is offered in EHLO only when configured and only before TLS", function()
    H.run(function()
      local plain_mta, plain_port = H.start_mta({})
      local p = assert(H.connect(plain_port))
      p:expect(220)
      p:cmd("EHLO client.test")
      local t = p:expect(250)
      assert.is_nil(t:find("STARTTLS", 1, true))
      p:cmd("STARTTLS")
      p:expect(502, "5.5.1")
      p:close()
      H.stop_mta(plain_mta)

      local mta, port = start()
      p = assert(H.connect(port))
      p:expect(220)
      p:cmd("EHLO client.test")
      t = p:expect(250)
      assert.truthy(t:find("\nSTARTTLS", 1, true))
      p:cmd("STARTTLS now")
      p:expect(501, "5.5.4")
      p:cmd("STARTTLS")
      p:expect(220, "2.0.0")
      local info = assert(p:starttls("mx.test.example"))
      assert.equal("TLSv1.3", info.version)
      -- the session starts over: EHLO first, and no STARTTLS offered now
      p:cmd("MAIL FROM:<a@client.test>")
      p:expect(503, "5.5.1")
      p:cmd("EHLO client.test")
      t = p:expect(250)
      assert.is_nil(t:find("STARTTLS", 1, true))
      p:cmd("STARTTLS")
      p:expect(503, "5.5.1", "TLS already active")
      p:cmd("QUIT")
      p:expect(221)
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("negotiates TLSv1.3 with openssl s_client -starttls smtp, and logs version and cipher", function()
    H.run(function()
      local mta, port = start()
      local code, out, err = s_client({ "s_client", "-connect", "127.0.0.1:" .. port, "-starttls", "smtp",
        "-brief", "-CAfile", H.certs() .. "/ca.pem", "-verify_return_error", "-verify_hostname",
        "mx.test.example" })
      local all = out .. err
      assert.equal(0, code, all)
      assert.truthy(all:find("Protocol version: TLSv1.3", 1, true), all)
      assert.truthy(all:find("Verification: OK", 1, true), all)
      H.wait_for(function() return #H.log("TLS TLSv1.3 TLS_") > 0 end, 5)
      H.stop_mta(mta)
    end)
  end)

  it("with min_version = 1.3 refuses a TLS 1.2-only client and still takes TLS 1.3", function()
    H.run(function()
      local mta, port = start({ tls = tls_opts({ min_version = "1.3" }) })
      local code, out, err = s_client({ "s_client", "-connect", "127.0.0.1:" .. port, "-starttls", "smtp",
        "-brief", "-tls1_2" })
      assert.are_not.equal(0, code, out .. err)
      assert.is_nil((out .. err):find("Protocol version: TLSv1.2", 1, true))
      H.wait_for(function() return #H.log("TLS handshake failed") > 0 end, 5)
      code, out, err = s_client({ "s_client", "-connect", "127.0.0.1:" .. port, "-starttls", "smtp",
        "-brief", "-tls1_3" })
      assert.equal(0, code, out .. err)
      assert.truthy((out .. err):find("Protocol version: TLSv1.3", 1, true))
      -- and TLS 1.2 works when allowed (the default)
      H.stop_mta(mta)
      mta, port = start()
      code, out, err = s_client({ "s_client", "-connect", "127.0.0.1:" .. port, "-starttls", "smtp",
        "-brief", "-tls1_2" })
      assert.equal(0, code, out .. err)
      assert.truthy((out .. err):find("Protocol version: TLSv1.2", 1, true))
      H.stop_mta(mta)
    end)
  end)

  it("uses the configured TLS 1.3 suites, TLS 1.2 ciphers and groups", function()
    H.run(function()
      local mta, port = start({ tls = tls_opts({ ciphersuites = "TLS_CHACHA20_POLY1305_SHA256",
        ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256", groups = "P-384" }) })
      local code, out, err = s_client({ "s_client", "-connect", "127.0.0.1:" .. port, "-starttls", "smtp",
        "-brief" })
      local all = out .. err
      assert.equal(0, code, all)
      assert.truthy(all:find("Ciphersuite: TLS_CHACHA20_POLY1305_SHA256", 1, true), all)
      assert.truthy(all:find("Server Temp Key: ECDH, secp384r1", 1, true), all)
      code, out, err = s_client({ "s_client", "-connect", "127.0.0.1:" .. port, "-starttls", "smtp",
        "-brief", "-tls1_2" })
      all = out .. err
      assert.equal(0, code, all)
      assert.truthy(all:find("Ciphersuite: ECDHE-ECDSA-AES128-GCM-SHA256", 1, true), all)
      H.stop_mta(mta)
    end)
  end)

  it("delivers from swaks --tls; the Received header names protocol and cipher", function()
    H.run(function()
      local mta, port, got = start()
      local code, out = H.exec("swaks", { "--server", "127.0.0.1", "--port", tostring(port), "--tls",
        "--from", "a@client.test", "--to", "b@mx.test", "--helo", "client.test", "--body", "over TLS" },
        { timeout = 30 })
      assert.equal(0, code, out)
      assert.equal(1, #got)
      local r = got[1].text:match("^(Received:.-)\r\n[^\t]")
      assert.truthy(r:find("(using TLSv1.3 with cipher TLS_", 1, true), r)
      assert.truthy(r:find("with ESMTPS id", 1, true), r)
      assert.equal("TLSv1.3", got[1].tls.version)
      H.stop_mta(mta)
    end)
  end)

  it("delivers from Python smtplib after starttls() with the certificate verified", function()
    H.run(function()
      local mta, port, got = start()
      -- smtplib checks the certificate against the host it connected to
      -- (its _host), here an address: name the host the certificate has
      local script = [[
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
s._host = "mx.test.example"
s.ehlo("client.test")
assert s.has_extn("starttls")
s.starttls(context=ctx)
print(s.sock.version(), s.sock.cipher()[0])
s.ehlo("client.test")
assert not s.has_extn("starttls")
s.sendmail("a@client.test", ["b@mx.test"], b"Subject: py\r\n\r\nhello over TLS\r\n")
s.quit()
]]
      local code, out, err = H.exec(PY, { "-c", script, tostring(port), H.certs() .. "/ca.pem" },
        { timeout = 30 })
      assert.equal(0, code, out .. err)
      assert.truthy(out:find("^TLSv1.3 TLS_"), out)
      assert.equal(1, #got)
      assert.truthy(got[1].text:find("hello over TLS", 1, true))
      H.stop_mta(mta)
    end)
  end)

  it("ignores plaintext commands pipelined behind STARTTLS (command injection)", function()
    H.run(function()
      local mta, port, got = start()
      local script = [[
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
f = s.makefile("rb")
def reply(f):
    lines = []
    while True:
        l = f.readline()
        if not l: return lines
        lines.append(l.decode().rstrip("\r\n"))
        if l[3:4] == b" ": return lines
print(reply(f))
s.sendall(b"EHLO client.test\r\n")
print(reply(f))
# one write: STARTTLS and then injected commands, all in plaintext
s.sendall(b"STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@mx.test>\r\n")
print(reply(f))
ctx = ssl.create_default_context(cafile=sys.argv[2])
t = ctx.wrap_socket(s, server_hostname="mx.test.example")
g = t.makefile("rb")
t.sendall(b"EHLO client.test\r\n")
print("after-tls", reply(g))
t.sendall(b"MAIL FROM:<good@client.test>\r\n")
print("mail", reply(g))
t.sendall(b"RCPT TO:<b@mx.test>\r\n")
print("rcpt", reply(g))
t.sendall(b"DATA\r\n")
print("data", reply(g))
t.sendall(b"Subject: ok\r\n\r\nclean\r\n.\r\n")
print("done", reply(g))
t.sendall(b"QUIT\r\n")
print("quit", reply(g))
]]
      local code, out, err = H.exec(PY, { "-c", script, tostring(port), H.certs() .. "/ca.pem" },
        { timeout = 30 })
      assert.equal(0, code, out .. err)
      -- after the handshake the first reply is the EHLO's; MAIL is not "nested"
      assert.truthy(out:find("after%-tls %['250%-mx%.test"), out)
      assert.truthy(out:find("mail %['250 2%.1%.0"), out)
      assert.truthy(out:find("rcpt %['250 2%.1%.5"), out)
      assert.truthy(out:find("done %['250 2%.0%.0"), out)
      assert.equal(1, #got)
      assert.equal("good@client.test", got[1].txn.sender.address)
      assert.equal(1, #got[1].txn.recipients)
      assert.equal("b@mx.test", got[1].txn.recipients[1].address)
      H.stop_mta(mta)
    end)
  end)

  it("answers 530 5.7.0 to MAIL before STARTTLS when TLS is required", function()
    H.run(function()
      local mta, port = start({ tls = tls_opts({ required = true }) })
      local p = assert(H.connect(port))
      p:script([[
        S: 220
        C: EHLO client.test
        S: 250
        C: MAIL FROM:<a@client.test>
        S: 530 5.7.0 Must issue a STARTTLS command first
        C: STARTTLS
        S: 220 2.0.0
      ]])
      assert(p:starttls("mx.test.example"))
      p:script([[
        C: EHLO client.test
        S: 250
        C: MAIL FROM:<a@client.test>
        S: 250 2.1.0
        C: QUIT
        S: 221
      ]])
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("closes only the session whose handshake fails", function()
    H.run(function()
      local mta, port = start()
      local p = assert(H.connect(port))
      p:script([[
        S: 220
        C: EHLO client.test
        S: 250
        C: STARTTLS
        S: 220
      ]])
      p:send("this is not a ClientHello\r\n\r\n")
      assert.is_true(p:closed(5))
      p:close()
      H.wait_for(function() return #H.log("TLS handshake failed") > 0 end, 5)
      -- the server goes on
      assert.equal(250, (H.send(port)))
      H.stop_mta(mta)
    end)
  end)

  it("survives writing to TLS clients that have hung up (EPIPE, not SIGPIPE)", function()
    H.run(function()
      -- the client goes away; the server, not knowing yet, is stopped and
      -- writes 421 and its close_notify to the dead socket
      local mta, port = start()
      local p = assert(H.connect(port))
      p:script("S: 220\nC: EHLO client.test\nS: 250\nC: STARTTLS\nS: 220 2.0.0")
      assert(p:starttls("mx.test.example"))
      p:script("C: EHLO client.test\nS: 250")
      p:close()
      H.stop_mta(mta)
      mta, port = start()
      assert.equal(250, (H.send(port)))
      H.stop_mta(mta)
    end)
  end)

  it("chooses the certificate by SNI, with wildcards, and the first one without SNI", function()
    H.run(function()
      local d = H.certs()
      local mta, port = start({ tls = { certs = {
        { cert = d .. "/mx.pem", key = d .. "/mx.key" },
        { cert = d .. "/other.pem", key = d .. "/other.key" },
      } } })
      local function subject(name)
        local args = { "s_client", "-connect", "127.0.0.1:" .. port, "-starttls", "smtp" }
        if name then
          args[#args + 1] = "-servername"
          args[#args + 1] = name
        else
          args[#args + 1] = "-noservername"
        end
        local code, out, err = s_client(args)
        assert.equal(0, code, out .. err)
        return out:match("subject=([^\n]*)")
      end
      assert.truthy(subject("other.example"):find("CN = other.example", 1, true))
      assert.truthy(subject("mail.other.example"):find("CN = other.example", 1, true))
      assert.truthy(subject("mx.test.example"):find("CN = mx.test.example", 1, true))
      assert.truthy(subject("unknown.example"):find("CN = mx.test.example", 1, true))
      assert.truthy(subject(nil):find("CN = mx.test.example", 1, true))
      H.stop_mta(mta)
    end)
  end)

  it("matches an SNI name with a trailing dot (an absolute name) like the name without it", function()
    H.run(function()
      local d = H.certs()
      local mta, port = start({ tls = { certs = {
        { cert = d .. "/mx.pem", key = d .. "/mx.key" },
        { cert = d .. "/other.pem", key = d .. "/other.key" },
      } } })
      local function subject(name)
        local code, out, err = s_client({ "s_client", "-connect", "127.0.0.1:" .. port, "-starttls", "smtp",
          "-servername", name })
        assert.equal(0, code, out .. err)
        return out:match("subject=([^\n]*)")
      end
      assert.truthy(subject("other.example."):find("CN = other.example", 1, true))
      assert.truthy(subject("mail.other.example."):find("CN = other.example", 1, true))
      assert.truthy(subject("mx.test.example."):find("CN = mx.test.example", 1, true))
      -- one dot only: "other.example.." is no host name
      assert.truthy(subject("other.example.."):find("CN = mx.test.example", 1, true))
      H.stop_mta(mta)
    end)
  end)
end)

describe("implicit TLS listener", function()
  it("speaks TLS from the first byte to openssl s_client and swaks --tlsc", function()
    H.run(function()
      local mta, port, got = start({ tls = tls_opts({ implicit = true }) })
      local code, out, err = s_client({ "s_client", "-connect", "127.0.0.1:" .. port, "-brief",
        "-ign_eof", "-CAfile", H.certs() .. "/ca.pem", "-verify_return_error" }, "EHLO client.test\r\nQUIT\r\n")
      local all = out .. err
      assert.equal(0, code, all)
      assert.truthy(all:find("Protocol version: TLSv1.3", 1, true), all)
      assert.truthy(out:find("220 mx.test ESMTP", 1, true), all)
      assert.is_nil(out:find("STARTTLS", 1, true))
      code, out = H.exec("swaks", { "--server", "127.0.0.1", "--port", tostring(port), "--tlsc",
        "--from", "a@client.test", "--to", "b@mx.test", "--helo", "client.test" }, { timeout = 30 })
      assert.equal(0, code, out)
      assert.equal(1, #got)
      assert.truthy(got[1].text:find("using TLSv1.3", 1, true))
      -- a plaintext client gets no greeting and is closed at the handshake
      local p = assert(H.connect(port))
      p:send("EHLO client.test\r\n")
      assert.is_true(p:closed(5))
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("answers the client's close_notify with its own before closing (RFC 8446 6.1)", function()
    H.run(function()
      local mta, port = start({ tls = tls_opts({ implicit = true }) })
      -- unwrap() sends close_notify and waits for the server's. Python sets
      -- OP_IGNORE_UNEXPECTED_EOF, which takes a bare TCP close for one:
      -- clear it, so that a close without close_notify raises
      local script = [[
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
raw = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
s = ctx.wrap_socket(raw, server_hostname="mx.test.example")
def reply():
    buf = b""
    while not (buf.endswith(b"\r\n") and buf.split(b"\r\n")[-2][3:4] == b" "):
        d = s.recv(4096)
        if not d: break
        buf += d
    return buf.decode()
print("greeting", reply().split("\r\n")[0])
s.sendall(b"EHLO client.test\r\n")
print("ehlo", reply().split("\r\n")[0])
try:
    plain = s.unwrap()
    print("close_notify received")
    print("then eof", plain.recv(1) == b"")
except (ssl.SSLError, OSError) as e:
    print("unwrap failed:", type(e).__name__, e)
]]
      local code, out, err = H.exec(PY, { "-c", script, tostring(port), H.certs() .. "/ca.pem" },
        { timeout = 30 })
      assert.equal(0, code, out .. err)
      assert.truthy(out:find("greeting 220 mx.test", 1, true), out)
      assert.truthy(out:find("ehlo 250-mx.test", 1, true), out)
      assert.truthy(out:find("close_notify received\nthen eof True", 1, true), out .. err)
      H.stop_mta(mta)
    end)
  end)
end)

describe("TLS configuration", function()
  it("names the file that cannot be used", function()
    local d = H.certs()
    local accept = require "moonpost.accept"
    local ok, err = pcall(accept.smtp, { tls = { cert = d .. "/missing.pem", key = d .. "/mx.key" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("field 'tls'", 1, true))
    assert.truthy(tostring(err):find("missing.pem: cannot read the certificate", 1, true), err)
    ok, err = pcall(accept.smtp, { tls = { cert = d .. "/mx.pem", key = d .. "/other.key" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("other.key: the key does not match the certificate", 1, true), err)
    ok, err = pcall(accept.smtp, { tls = { cert = d .. "/ca.srl", key = d .. "/mx.key" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("ca.srl: not a usable PEM certificate chain", 1, true), err)
    ok, err = pcall(accept.smtp, { tls = { cert = d .. "/mx.pem" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("field 'cert' needs 'key' too", 1, true), err)
    ok, err = pcall(accept.smtp, { tls = { cert = d .. "/mx.pem", key = d .. "/mx.key", min_version = "1.1" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("field 'min_version'", 1, true), err)
    ok, err = pcall(accept.smtp, { tls = { cert = d .. "/mx.pem", key = d .. "/mx.key", ciphersuites = "NOPE" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("ciphersuites", 1, true), err)
  end)
end)

describe("certificate reload", function()
  it("SIGHUP reads the certificate again without dropping connections; a bad file keeps the old one", function()
    H.run(function()
      local d = H.certs()
      local dir = H.tmpdir()
      local cert, key = dir .. "/cert.pem", dir .. "/key.pem"
      H.write(cert, H.read(d .. "/mx.pem"))
      H.write(key, H.read(d .. "/mx.key"))
      local proc = H.launch(H.root .. "/examples/quickstart.lua", {
        MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail",
        MOONPOST_TLS_CERT = cert, MOONPOST_TLS_KEY = key })
      local function tls_session()
        local p = assert(H.connect(proc.port))
        p:script("S: 220\nC: EHLO client.test\nS: 250\nC: STARTTLS\nS: 220 2.0.0")
        local info = assert(p:starttls())
        p:script("C: EHLO client.test\nS: 250")
        return p, info
      end
      local held, info = tls_session()
      assert.truthy(info.peer_subject:find("CN=mx.test.example", 1, true), info.peer_subject)

      H.write(cert, H.read(d .. "/other.pem"))
      H.write(key, H.read(d .. "/other.key"))
      require("luv").kill(proc.pid, "sighup")
      H.wait_for(function() return proc.log():find("TLS certificates reloaded", 1, true) end, 10)
      -- the connection from before the reload carries on
      held:script([[
        C: MAIL FROM:<a@client.test>
        S: 250 2.1.0
        C: RCPT TO:<held@mx.test>
        S: 250 2.1.5
        C: DATA
        S: 354
      ]])
      held:send("Subject: held\r\n\r\nsent across a reload\r\n.\r\n")
      held:expect(250, "2.0.0")
      local p2, info2 = tls_session()
      assert.truthy(info2.peer_subject:find("CN=other.example", 1, true), info2.peer_subject)
      p2:close()

      H.write(cert, "not a certificate\n")
      require("luv").kill(proc.pid, "sighup")
      H.wait_for(function() return proc.log():find("TLS reload failed, keeping the old certificates", 1, true) end, 10)
      assert.truthy(proc.log():find("cert.pem: not a usable PEM certificate chain", 1, true))
      local p3, info3 = tls_session()
      assert.truthy(info3.peer_subject:find("CN=other.example", 1, true), info3.peer_subject)
      p3:close()
      held:script("C: QUIT\nS: 221")
      held:close()
      assert.equal(0, proc.stop())
      H.wait_for(function() return #H.ls(dir .. "/mail/held/new") == 1 end, 5)
      H.rm_rf(dir)
    end)
  end)
end)
