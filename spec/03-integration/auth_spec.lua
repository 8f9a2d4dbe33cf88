-- The accept side of tenants: SMTP AUTH PLAIN and LOGIN (RFC 4954) with
-- real clients (swaks, Python's smtplib), relay control by authentication
-- and by network, the tenant of a message (user, listener, header), and the
-- inbound budgets of each tenant (connections, message rate, queue quota).
local H = require "helpers"
local passwd = require "moonpost.runtime.passwd"
local cjson = require "cjson"
local uv = require "luv"

local PY = H.python
local b64 = passwd.b64encode

local function plain(user, pw, authz) return b64((authz or "") .. "\0" .. user .. "\0" .. pw) end

local function tls_opts(extra)
  local d = H.certs()
  local t = { cert = d .. "/mx.pem", key = d .. "/mx.key" }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- Cheap hashes: the default cost is measured in its own test.
local USERS = {
  { "alice@acme.test", "alice-pw", "acme", { scheme = "pbkdf2-sha256", iterations = 1000 } },
  { "bob@beta.test", "bob-pw", "beta", { scheme = "scrypt", ln = 10, r = 8, p = 1 } },
  { "nobody@x.test", "nobody-pw", nil, { scheme = "pbkdf2-sha256", iterations = 1000 } },
}

local users_path
local function users_file()
  if not users_path then
    local lines = { "# user:hash:tenant", "" }
    for _, u in ipairs(USERS) do
      lines[#lines + 1] = u[1] .. ":" .. assert(passwd.hash(u[2], u[4])) .. (u[3] and (":" .. u[3]) or "")
    end
    users_path = H.tmpdir() .. "/users.txt"
    H.write(users_path, table.concat(lines, "\n") .. "\n")
  end
  return users_path
end

local function tenants(extra)
  local t = { acme = {}, beta = {}, gamma = {} }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- An MTA with STARTTLS and AUTH from the users file; every message is
-- recorded (txn, text). opts.accept, opts.new (moonpost.new), opts.setup.
local function start(o)
  o = o or {}
  local got = {}
  local a = { tls = tls_opts(), auth = { file = users_file(), failure_delay = 0.05 } }
  for k, v in pairs(o.accept or {}) do a[k] = v end
  if a.tls == false then a.tls = nil end
  local no = { tenants = tenants() }
  for k, v in pairs(o.new or {}) do no[k] = v end
  local mta, port = H.start_mta(a, function(mta, moonpost)
    mta:on("smtp_server_message_received", function(txn, msg)
      got[#got + 1] = { txn = txn, text = msg:tostring() }
    end)
    if o.setup then o.setup(mta, moonpost) end
  end, no)
  return mta, port, got
end

-- After EHLO on a fresh connection: STARTTLS, handshake, EHLO again.
local function tls_session(port, bind)
  local p = assert(H.connect(port, nil, nil, bind))
  p:script("S: 220\nC: EHLO client.test\nS: 250\nC: STARTTLS\nS: 220 2.0.0")
  assert(p:starttls("mx.test.example"))
  p:cmd("EHLO client.test")
  local ehlo = p:expect(250)
  return p, ehlo
end

local function login(p, user, pw)
  p:cmd("AUTH PLAIN " .. plain(user, pw))
  p:expect(235, "2.7.0", "Authentication successful")
end

local function send_message(p, from, to, body)
  p:cmd("MAIL FROM:<" .. from .. ">")
  local c, e, t = p:reply()
  if c ~= 250 then return c, e, t end
  p:cmd("RCPT TO:<" .. to .. ">")
  c, e, t = p:reply()
  if c ~= 250 then
    p:cmd("RSET")
    p:expect(250)
    return c, e, t
  end
  p:cmd("DATA")
  p:expect(354)
  p:send((body or "Subject: t\r\n\r\nbody\r\n") .. ".\r\n")
  return p:reply()
end

-- The tenants of the messages in a spool, oldest first, read by the CLI.
local function spooled(dir)
  local code, out, err = H.exec(H.root .. "/scripts/moonpost", { "spool", "list", dir, "--json" })
  assert.equal(0, code, err)
  local list = {}
  for i, m in ipairs(cjson.decode(out).messages) do list[i] = m.tenant == nil and "-" or m.tenant end
  return list
end

describe("AUTH", function()
  it("swaks --auth PLAIN and LOGIN --tls succeed, and the stored message has the user's tenant", function()
    H.run(function()
      local dir = H.tmpdir()
      local mta, port = start({ new = { spool = dir .. "/spool" } })
      for _, mech in ipairs({ "PLAIN", "LOGIN" }) do
        local code, out = H.exec("swaks", { "--server", "127.0.0.1", "--port", tostring(port), "--tls",
          "--auth", mech, "--auth-user", "alice@acme.test", "--auth-password", "alice-pw",
          "--from", "alice@acme.test", "--to", "someone@elsewhere.test", "--helo", "client.test" }, { timeout = 30 })
        assert.equal(0, code, out)
        assert.truthy(out:find("AUTH " .. mech, 1, true), out)
        assert.truthy(out:find("235 2.7.0 Authentication successful", 1, true), out)
        if mech == "LOGIN" then
          assert.truthy(out:find("334 VXNlcm5hbWU6", 1, true), out)
          assert.truthy(out:find("334 UGFzc3dvcmQ6", 1, true), out)
        end
      end
      H.stop_mta(mta)
      assert.same({ "acme", "acme" }, spooled(dir .. "/spool"))
      H.rm_rf(dir)
    end)
  end)

  it("Python smtplib starttls() then login() (PLAIN) and auth(LOGIN) succeed; AUTH is offered only inside TLS", function()
    H.run(function()
      local dir = H.tmpdir()
      local mta, port, got = start({ new = { spool = dir .. "/spool" } })
      local script = [[
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
for mech in ("PLAIN", "LOGIN"):
    s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
    s._host = "mx.test.example"
    s.ehlo("client.test")
    assert not s.has_extn("auth"), s.esmtp_features
    s.starttls(context=ctx)
    s.ehlo("client.test")
    print("offered", s.esmtp_features["auth"])
    if mech == "PLAIN":
        print("login", s.login("bob@beta.test", "bob-pw"))
    else:
        s.user, s.password = "bob@beta.test", "bob-pw"
        print("login", s.auth("LOGIN", s.auth_login))
    s.sendmail("bob@beta.test", ["x@elsewhere.test"], b"Subject: py\r\n\r\nhi " + mech.encode() + b"\r\n")
    s.quit()
]]
      local code, out, err = H.exec(PY, { "-c", script, tostring(port), H.certs() .. "/ca.pem" }, { timeout = 30 })
      assert.equal(0, code, out .. err)
      assert.truthy(out:find("offered%s+PLAIN LOGIN\n"), out)
      local _, n = out:gsub("login %(235, b'2%.7%.0 Authentication successful'%)", "")
      assert.equal(2, n, out)
      assert.equal(2, #got)
      for _, g in ipairs(got) do
        assert.equal("beta", g.txn.tenant)
        assert.equal("bob@beta.test", g.txn.auth)
        local received = g.text:match("^(Received:.-)\r\n[^\t]")
        assert.truthy(received:find("with ESMTPSA id", 1, true), received)
      end
      H.stop_mta(mta)
      assert.same({ "beta", "beta" }, spooled(dir .. "/spool"))
      H.rm_rf(dir)
    end)
  end)

  it("refuses AUTH before STARTTLS with 538 5.7.11 and does not advertise it", function()
    H.run(function()
      local mta, port = start()
      local p = assert(H.connect(port))
      p:expect(220)
      p:cmd("EHLO client.test")
      local ehlo = p:expect(250)
      assert.is_nil(ehlo:find("AUTH", 1, true), ehlo)
      assert.truthy(ehlo:find("STARTTLS", 1, true), ehlo)
      p:cmd("AUTH PLAIN " .. plain("alice@acme.test", "alice-pw"))
      p:expect(538, "5.7.11", "Encryption required")
      p:cmd("AUTH LOGIN")
      p:expect(538, "5.7.11")
      -- HELP names the commands this listener takes
      p:cmd("HELP")
      assert.equal("Commands: HELO EHLO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP", p:expect(214, "2.0.0"))
      p:close()
      local q, ehlo2 = tls_session(port)
      assert.truthy(ehlo2:find("\nAUTH PLAIN LOGIN\n", 1, true), ehlo2)
      assert.is_nil(ehlo2:find("STARTTLS", 1, true))
      q:close()
      H.stop_mta(mta)
    end)
  end)

  it("answers every failure with its code: 535 5.7.8, 501 5.5.2, 501 5.0.0, 504 5.5.4, 503 5.5.1", function()
    H.run(function()
      local mta, port = start({ accept = { auth = { file = users_file(), failure_delay = 0.3 } } })
      local p = tls_session(port)
      -- wrong password, after a delay
      local t0 = uv.now()
      p:cmd("AUTH PLAIN " .. plain("alice@acme.test", "wrong"))
      p:expect(535, "5.7.8", "Authentication credentials invalid")
      assert.truthy(uv.now() - t0 >= 280, "no delay after a failure")
      -- unknown user: the same reply
      p:cmd("AUTH PLAIN " .. plain("mallory@acme.test", "alice-pw"))
      p:expect(535, "5.7.8")
      -- another identity than one's own
      p:cmd("AUTH PLAIN " .. plain("alice@acme.test", "alice-pw", "bob@beta.test"))
      p:expect(535, "5.7.8")
      p:script([[
        C: AUTH PLAIN not*base64
        S: 501 5.5.2 invalid base64
        C: AUTH PLAIN AHVzZXIAcGFzcw
        S: 501 5.5.2 invalid base64
        C: AUTH PLAIN
        S: 334
        C: %%%%
        S: 501 5.5.2 invalid base64
        C: AUTH PLAIN
        S: 334
        C: *
        S: 501 5.0.0 Authentication cancelled
        C: AUTH LOGIN
        S: 334 VXNlcm5hbWU6
        C: *
        S: 501 5.0.0 Authentication cancelled
        C: AUTH PLAIN =
        S: 501 5.5.2 malformed PLAIN response
        C: AUTH CRAM-MD5
        S: 504 5.5.4 Unrecognized authentication type
        C: AUTH
        S: 501 5.5.4 Syntax: AUTH mechanism
      ]])
      -- the right password at last, with the response on its own line
      p:cmd("AUTH PLAIN")
      p:expect(334)
      p:cmd(plain("alice@acme.test", "alice-pw"))
      p:expect(235, "2.7.0")
      p:script([[
        C: AUTH PLAIN dGVzdA==
        S: 503 5.5.1 already authenticated
        C: MAIL FROM:<alice@acme.test> AUTH=<>
        S: 250 2.1.0
        C: QUIT
        S: 221
      ]])
      p:close()
      -- AUTH inside a transaction, and before EHLO
      local q = tls_session(port)
      q:script([[
        C: MAIL FROM:<a@client.test> AUTH=alice+40acme.test
        S: 250 2.1.0
        C: AUTH PLAIN ]] .. plain("alice@acme.test", "alice-pw") .. [[

        S: 503 5.5.1 mail transaction
        C: RSET
        S: 250
        C: HELO client.test
        S: 250
        C: AUTH PLAIN ]] .. plain("alice@acme.test", "alice-pw") .. [[

        S: 503 5.5.1 send EHLO first
      ]])
      q:close()
      H.stop_mta(mta)
    end)
  end)

  it("counts failed attempts towards max_errors", function()
    H.run(function()
      local mta, port = start({ accept = { max_errors = 3 } })
      local p = tls_session(port)
      p:cmd("AUTH PLAIN " .. plain("alice@acme.test", "nope"))
      p:expect(535, "5.7.8")
      p:cmd("AUTH LOGIN")
      p:expect(334, nil, "VXNlcm5hbWU6")
      p:cmd(b64("alice@acme.test"))
      p:expect(334, nil, "UGFzc3dvcmQ6")
      p:cmd(b64("nope again"))
      p:expect(535, "5.7.8")
      p:cmd("AUTH PLAIN " .. plain("alice@acme.test", "still wrong"))
      p:expect(421, "4.7.0", "too many errors")
      assert.is_true(p:closed(5))
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("offers AUTH in plaintext only with allow_plaintext, and at once on an implicit-TLS listener", function()
    H.run(function()
      local mta, port = start({ accept = { tls = false, auth = { file = users_file(), allow_plaintext = true,
        mechanisms = { "PLAIN" } } } })
      local p = assert(H.connect(port))
      p:expect(220)
      p:cmd("EHLO client.test")
      local ehlo = p:expect(250)
      assert.truthy(ehlo:find("\nAUTH PLAIN\n", 1, true), ehlo)
      login(p, "nobody@x.test", "nobody-pw")
      p:cmd("QUIT")
      p:expect(221)
      p:close()
      H.stop_mta(mta)

      mta, port = start({ accept = { tls = tls_opts({ implicit = true }) } })
      local code, out = H.exec("swaks", { "--server", "127.0.0.1", "--port", tostring(port), "--tlsc",
        "--auth", "PLAIN", "--auth-user", "bob@beta.test", "--auth-password", "bob-pw",
        "--from", "bob@beta.test", "--to", "x@elsewhere.test", "--helo", "client.test" }, { timeout = 30 })
      assert.equal(0, code, out)
      assert.truthy(out:find("235 2.7.0", 1, true), out)
      H.stop_mta(mta)
    end)
  end)

  it("remembers a matched password for auth.cache seconds; a wrong one and a changed users file pay in full", function()
    H.run(function()
      local dir = H.tmpdir()
      local path = dir .. "/users.txt"
      local function write_users(pw)
        H.write(path, "erin@acme.test:" .. assert(passwd.hash(pw, { scheme = "scrypt", ln = 14 })) .. ":acme\n")
      end
      write_users("erin-pw")
      local mta, port = start({ accept = { auth = { file = path, failure_delay = 0, cache = "1h" } } })
      local function timed(pw, code)
        local p = tls_session(port)
        local t0 = uv.hrtime()
        p:cmd("AUTH PLAIN " .. plain("erin@acme.test", pw))
        p:expect(code)
        local ms = (uv.hrtime() - t0) / 1e6
        p:close()
        return ms
      end
      local slow = timed("erin-pw", 235)          -- scrypt ln=14: tens of ms
      local fast = timed("erin-pw", 235)
      assert.truthy(slow > 30 and fast < slow / 3, string.format("first %.1f ms, then %.1f ms", slow, fast))
      assert.truthy(timed("erin-pw!", 535) > 30)  -- a wrong password is not helped
      -- the users file changes: the old password no longer works at once
      write_users("new-pw")
      assert.truthy(mta:reload())
      timed("erin-pw", 535)
      assert.truthy(timed("new-pw", 235) > 30)
      H.stop_mta(mta)
      H.rm_rf(dir)
    end)
  end)

  it("forgets a plaintext AUTH at STARTTLS: user, tenant and relaying go back to the listener's", function()
    H.run(function()
      local seen = {}
      local mta, port = start({ accept = { tenant = "gamma", auth = { file = users_file(), allow_plaintext = true },
        relay = { networks = {} }, local_domains = "mx.test" },
        setup = function(mta)
          mta:on("smtp_server_mail_from", function(txn) seen[#seen + 1] = { txn.auth, txn.tenant } end)
        end })
      local p = assert(H.connect(port))
      p:script("S: 220\nC: EHLO client.test\nS: 250")
      login(p, "alice@acme.test", "alice-pw")
      assert.equal(1, mta.tenants:connections("acme"))
      assert.equal(0, mta.tenants:connections("gamma"))
      p:script("C: STARTTLS\nS: 220 2.0.0")
      assert(p:starttls("mx.test.example"))
      p:script([[
        C: EHLO client.test
        S: 250
        C: MAIL FROM:<alice@acme.test>
        S: 250
        C: RCPT TO:<x@elsewhere.test>
        S: 554 5.7.1 Relaying denied
      ]])
      assert.same({ nil, "gamma" }, seen[1])
      assert.equal(0, mta.tenants:connections("acme"))
      assert.equal(1, mta.tenants:connections("gamma"))
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("auth.required refuses MAIL before AUTH with 530 5.7.0", function()
    H.run(function()
      local mta, port = start({ accept = { auth = { file = users_file(), required = true, failure_delay = 0 } } })
      local p = tls_session(port)
      p:cmd("MAIL FROM:<a@client.test>")
      p:expect(530, "5.7.0", "Authentication required")
      login(p, "nobody@x.test", "nobody-pw")
      p:cmd("MAIL FROM:<nobody@x.test>")
      p:expect(250, "2.1.0")
      p:close()
      H.stop_mta(mta)
    end)
  end)

  -- an idle session parks (docs/accept.md#idle-sessions): TLS and the
  -- login are the session's, not its coroutine's, and survive it
  it("keeps TLS and the login of a session that parked while idle, and parks again", function()
    H.run(function()
      local mta, port, got = start({ accept = { idle_park_after = 0.05 } })
      local function parked() return H.parked(mta) end
      local p = tls_session(port)
      assert.is_true(H.wait_for(function() return parked() == 1 end, 5))
      login(p, "alice@acme.test", "alice-pw")
      assert.is_true(H.wait_for(function() return parked() == 1 end, 5))
      -- relaying needs the login: the session still has it after parking
      assert.equal(250, (send_message(p, "alice@acme.test", "x@elsewhere.test")))
      assert.is_true(H.wait_for(function() return parked() == 1 end, 5))
      assert.equal(250, (send_message(p, "alice@acme.test", "y@elsewhere.test")))
      p:cmd("QUIT")
      p:expect(221)
      p:close()
      assert.equal(2, #got)
      for i = 1, 2 do
        assert.equal("alice@acme.test", got[i].txn.auth)
        assert.equal("acme", got[i].txn.tenant)
        assert.equal("TLSv1.3", got[i].txn.conn.tls_info.version)
      end
      H.stop_mta(mta)
    end)
  end)

  it("auth.check: a policy function that may wait gives the tenant; nil, err is a temporary failure", function()
    H.run(function()
      local seen = {}
      local mta, port, got = start({ accept = { auth = { failure_delay = 0, check = function(user, pw, conn)
        seen[#seen + 1] = conn.remote_ip
        require("moonpost").sleep(0.05)
        if user == "db-down" then return nil, "database unreachable" end
        if user == "carol" and pw == "carol-pw" then return "gamma" end
        if user == "dave" and pw == "dave-pw" then return true end
        return nil
      end } } })
      local p = tls_session(port)
      p:cmd("AUTH PLAIN " .. plain("carol", "bad"))
      p:expect(535, "5.7.8")
      p:cmd("AUTH PLAIN " .. plain("db-down", "x"))
      p:expect(454, "4.7.0", "Temporary authentication failure")
      login(p, "carol", "carol-pw")
      assert.equal(250, (send_message(p, "carol@client.test", "x@elsewhere.test")))
      p:close()
      local q = tls_session(port)
      login(q, "dave", "dave-pw")
      assert.equal(250, (send_message(q, "dave@client.test", "x@elsewhere.test")))
      q:close()
      assert.equal("127.0.0.1", seen[1])
      assert.equal(2, #got)
      assert.equal("gamma", got[1].txn.tenant)
      assert.equal("carol", got[1].txn.auth)
      assert.is_nil(got[2].txn.tenant)
      assert.equal("dave", got[2].txn.auth)
      H.stop_mta(mta)
    end)
  end)

  it("hooks for sender and recipient see txn.tenant and txn.auth", function()
    H.run(function()
      local seen = {}
      local mta, port = start({ setup = function(mta)
        mta:on("smtp_server_mail_from", function(txn)
          seen[#seen + 1] = { "mail", txn.tenant, txn.auth, txn.conn.tenant, txn.conn.auth }
        end)
        mta:on("smtp_server_rcpt_to", function(txn, rcpt)
          seen[#seen + 1] = { "rcpt", txn.tenant, txn.auth, rcpt.address }
        end)
      end, accept = { tenant = "gamma" } })
      local p = tls_session(port)
      assert.equal(250, (send_message(p, "anon@client.test", "x@mx.test")))
      login(p, "alice@acme.test", "alice-pw")
      assert.equal(250, (send_message(p, "alice@acme.test", "y@elsewhere.test")))
      p:close()
      assert.same({ "mail", "gamma", nil, "gamma", nil }, seen[1])
      assert.same({ "rcpt", "gamma", nil, "x@mx.test" }, seen[2])
      assert.same({ "mail", "acme", "alice@acme.test", "acme", "alice@acme.test" }, seen[3])
      assert.same({ "rcpt", "acme", "alice@acme.test", "y@elsewhere.test" }, seen[4])
      H.stop_mta(mta)
    end)
  end)
end)

describe("the moonpost passwd command", function()
  it("prints a users-file line whose hash Python recomputes and AUTH accepts (default cost)", function()
    H.run(function()
      local code, out, err = H.exec(H.root .. "/scripts/moonpost", { "passwd", "carol@acme.test", "acme" },
        { stdin = "carol's long passphrase\n" })
      assert.equal(0, code, err)
      local user, hash, tenant = out:match("^([^:]+):([^:]+):([^:]+)\n$")
      assert.equal("carol@acme.test", user)
      assert.equal("acme", tenant)
      assert.truthy(hash:match("^%$scrypt%$ln=15,r=8,p=1%$"), hash)
      local script = [[
import base64, hashlib, sys
def b64(s): return base64.b64decode(s + "=" * (-len(s) % 4))
_, scheme, params, salt, key = sys.argv[1].split("$")
p = dict(x.split("=") for x in params.split(","))
k = hashlib.scrypt(sys.argv[2].encode(), salt=b64(salt), n=2 ** int(p["ln"]), r=int(p["r"]), p=int(p["p"]),
                   maxmem=2 ** 27, dklen=len(b64(key)))
print("ok" if k == b64(key) else "mismatch")
]]
      local pcode, pout, perr = H.exec(PY, { "-c", script, hash, "carol's long passphrase" })
      assert.equal(0, pcode, perr)
      assert.equal("ok\n", pout)
      -- the pbkdf2 form too
      code, out = H.exec(H.root .. "/scripts/moonpost", { "passwd", "--pbkdf2", "--iterations", "5000" },
        { stdin = "pw\n" })
      assert.equal(0, code)
      assert.truthy(out:match("^%$pbkdf2%-sha256%$5000%$[%w+/]+%$[%w+/]+\n$"), out)
      code = H.exec(H.root .. "/scripts/moonpost", { "passwd" }, { stdin = "" })
      assert.equal(1, code)
      code = H.exec(H.root .. "/scripts/moonpost", { "passwd", "bad:user" }, { stdin = "pw\n" })
      assert.equal(2, code)

      local dir = H.tmpdir()
      H.write(dir .. "/users.txt", user .. ":" .. hash .. ":" .. tenant .. "\n")
      local mta, port = start({ accept = { auth = { file = dir .. "/users.txt" } } })
      local p = tls_session(port)
      local t0 = uv.hrtime()
      login(p, "carol@acme.test", "carol's long passphrase")
      local ms = (uv.hrtime() - t0) / 1e6
      -- measured, for the docs: scrypt ln=15,r=8,p=1 on this machine
      assert.truthy(ms > 20, ms)
      p:close()
      H.stop_mta(mta)
      H.rm_rf(dir)
    end)
  end)
end)

describe("users files", function()
  local accept = require "moonpost.accept"
  local function err_of(path)
    local ok, err = pcall(accept.smtp, { auth = { file = path } })
    assert.is_false(ok)
    return tostring(err)
  end

  it("a bad line is a config error naming the file and the line", function()
    local dir = H.tmpdir()
    local good = assert(passwd.hash("pw", { scheme = "pbkdf2-sha256", iterations = 1000 }))
    H.write(dir .. "/users.txt", "# users\na@x.test:" .. good .. ":acme\n\nb@x.test:$md5$1$x$y\n")
    local err = err_of(dir .. "/users.txt")
    assert.truthy(err:find("auth_spec.lua:%d+: accept.smtp: field 'auth': "), err)
    assert.truthy(err:find(dir .. "/users.txt:4: user 'b@x.test': unknown scheme 'md5'", 1, true), err)
    H.write(dir .. "/users.txt", "a@x.test:" .. good .. ":acme\nnot a line\n")
    assert.truthy(err_of(dir .. "/users.txt"):find("users.txt:2: expected user:hash", 1, true))
    H.write(dir .. "/users.txt", "a@x.test:" .. good .. ":ac me\n")
    assert.truthy(err_of(dir .. "/users.txt"):find("users.txt:1: user 'a@x.test': bad tenant name 'ac me'", 1, true))
    H.write(dir .. "/users.txt", "a@x.test:" .. good .. "\na@x.test:" .. good .. "\n")
    assert.truthy(err_of(dir .. "/users.txt"):find("users.txt:2: user 'a@x.test' listed twice", 1, true))
    assert.truthy(err_of(dir .. "/missing.txt"):find("missing.txt: cannot read", 1, true))
    H.write(dir .. "/users.lua", "return {\n  ['a@x.test'] = { hash = '" .. good .. "', tenant = 'acme' },\n"
      .. "  ['b@x.test'] = { hash = '$pbkdf2-sha256$10$MDEyMzQ1Njc4OWFiY2RlZg$AAAA' },\n}\n")
    err = err_of(dir .. "/users.lua")
    assert.truthy(err:find("users.lua:3: user 'b@x.test': pbkdf2-sha256: iterations must be", 1, true), err)
    H.write(dir .. "/users.lua", "return {\n  ['a@x.test'] = { hash = '" .. good .. "', tennant = 'acme' },\n}\n")
    assert.truthy(err_of(dir .. "/users.lua"):find("users.lua:2: user 'a@x.test': unknown field 'tennant'", 1, true))
    H.write(dir .. "/users.lua", "return {\n  ['a@x.test'] = \n")
    assert.truthy(err_of(dir .. "/users.lua"):find("users.lua:3:", 1, true))
    H.rm_rf(dir)
  end)

  it("unknown users are checked at the cost most of the file's hashes have (no timing oracle)", function()
    local dir = H.tmpdir()
    local function h(o) return assert(passwd.hash("pw", o)) end
    local p1000 = { scheme = "pbkdf2-sha256", iterations = 1000 }
    H.write(dir .. "/users.txt", "a@x.test:" .. h(p1000) .. "\nb@x.test:" .. h(p1000) .. "\nc@x.test:"
      .. h({ scheme = "scrypt", ln = 4, r = 8, p = 1 }) .. "\n")
    local users = assert(passwd.load_users(dir .. "/users.txt"))
    local d = passwd.dummy(users)
    assert.equal("pbkdf2-sha256", d.scheme)
    assert.equal(1000, d.iterations)
    assert.equal(d, passwd.dummy(users))
    assert.are_not.equal(users["a@x.test"].hash.salt, d.salt)
    H.write(dir .. "/users.txt", "c@x.test:" .. h({ scheme = "scrypt", ln = 4, r = 8, p = 1 }) .. "\n")
    d = passwd.dummy(assert(passwd.load_users(dir .. "/users.txt")))
    assert.same({ "scrypt", 4, 16, 8, 1 }, { d.scheme, d.ln, d.N, d.r, d.p })
    -- and it matches nothing
    H.run(function()
      assert.is_false(passwd.verify("pw", d))
      assert.is_false(passwd.verify("", d))
    end)
    -- no users: the default cost
    assert.equal("scrypt", passwd.dummy().scheme)
    assert.equal(passwd.DEFAULT_SCRYPT.ln, passwd.dummy().ln)
    H.rm_rf(dir)
  end)

  it("a tenant that is not declared is a config error at mta:use", function()
    local moonpost = require "moonpost"
    local dir = H.tmpdir()
    H.write(dir .. "/users.txt", "a@x.test:" .. assert(passwd.hash("pw", { scheme = "pbkdf2-sha256",
      iterations = 1000 })) .. ":omega\n")
    local mta = moonpost.new { tenants = { acme = {} } }
    local ok, err = pcall(mta.use, mta, accept.smtp { auth = { file = dir .. "/users.txt" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("users.txt:1: user 'a@x.test': tenant 'omega' is not declared", 1, true), err)
    ok, err = pcall(mta.use, mta, accept.smtp { tenant = "omega" })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("field 'tenant': tenant 'omega' is not declared in moonpost.new { tenants = ... } "
      .. "(declared: acme)", 1, true), err)
    H.rm_rf(dir)
  end)

  it("options are checked at load: auth, relay, local_domains, tenants", function()
    local moonpost = require "moonpost"
    local cases = {
      { { auth = {} }, "give either 'file'" },
      { { auth = { check = function() end, mechanisms = { "CRAM-MD5" } } }, "unknown mechanism 'CRAM-MD5'" },
      { { relay = { networks = { "10.0.0.1/8" } } }, "has bits set after the prefix (did you mean 10.0.0.0/8?)" },
      { { relay = { networks = { "example.com" } } }, "field 'networks' item 1: not an IP address" },
      { { relay = { open = true } }, "unknown field 'open'" },
      { { local_domains = { "exa mple.com" } }, "field 'local_domains' item 1: not a domain" },
      { { local_domains = { "ok.test", "b\255d.test" } }, "field 'local_domains' item 2: not a domain" },
      { { tenant_header = "X Tenant" }, "field 'tenant_header'" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(require("moonpost.accept").smtp, c[1])
      assert.is_false(ok)
      assert.truthy(tostring(err):find(c[2], 1, true), err)
    end
    local ok, err = pcall(moonpost.new, { tenants = { acme = { max_messages = "lots" } } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("tenants[\"acme\"]: field 'max_messages': expected a rate like", 1, true), err)
    ok, err = pcall(moonpost.new, { tenants = { ["a@b"] = {} } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("bad tenant name \"a@b\"", 1, true), err)
    ok, err = pcall(moonpost.new, { tenants = { acme = { max_queud = 5 } } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("unknown field 'max_queud'", 1, true), err)
  end)
end)

describe("relay control", function()
  it("denies relaying to an outside client that has not authenticated, and allows it after AUTH", function()
    H.run(function()
      local mta, port = start({ accept = { relay = { networks = { "127.0.0.1/32" } }, local_domains = { "mx.test",
        "*.sub.test", "bücher.test", "*.xn--caf-dma.test" } } })
      -- 127.0.0.2 is loopback, but not in 127.0.0.1/32
      local p = assert(H.connect(port, nil, nil, "127.0.0.2"))
      p:script([[
        S: 220
        C: EHLO client.test
        S: 250
        C: MAIL FROM:<a@client.test>
        S: 250 2.1.0
        C: RCPT TO:<victim@elsewhere.test>
        S: 554 5.7.1 Relaying denied
        C: RCPT TO:<local@MX.test>
        S: 250 2.1.5
        C: RCPT TO:<x@deep.sub.test>
        S: 250 2.1.5
        C: RCPT TO:<x@sub.test>
        S: 554 5.7.1
        C: RSET
        S: 250
        C: MAIL FROM:<a@client.test> SMTPUTF8
        S: 250 2.1.0
        C: RCPT TO:<u@bücher.test>
        S: 250 2.1.5
        C: RCPT TO:<u@BÜCHER.test>
        S: 250 2.1.5
        C: RCPT TO:<u@xn--bcher-kva.test>
        S: 250 2.1.5
        C: RCPT TO:<u@bar.café.test>
        S: 250 2.1.5
        C: RCPT TO:<u@bücherei.test>
        S: 554 5.7.1
        C: RCPT TO:<postmaster>
        S: 250 2.1.5
        C: QUIT
        S: 221
      ]])
      p:close()
      local q = tls_session(port, "127.0.0.2")
      q:script("C: MAIL FROM:<a@client.test>\nS: 250\nC: RCPT TO:<victim@elsewhere.test>\nS: 554 5.7.1\nC: RSET\nS: 250")
      login(q, "nobody@x.test", "nobody-pw")
      assert.equal(250, (send_message(q, "nobody@x.test", "friend@elsewhere.test")))
      q:close()
      -- from a listed network: no AUTH needed
      assert.equal(250, (H.send(port, { to = "friend@elsewhere.test" })))
      H.stop_mta(mta)

      -- relay.authenticated = false: AUTH does not open relaying
      mta, port = start({ accept = { relay = { authenticated = false, networks = {} }, local_domains = "mx.test" } })
      q = tls_session(port)
      login(q, "nobody@x.test", "nobody-pw")
      q:script("C: MAIL FROM:<a@client.test>\nS: 250\nC: RCPT TO:<friend@elsewhere.test>\nS: 554 5.7.1\n"
        .. "C: RCPT TO:<b@mx.test>\nS: 250")
      q:close()
      H.stop_mta(mta)
    end)
  end)

  it("by default lets loopback relay (127.0.0.0/8 and ::1), and matches IPv6 networks", function()
    H.run(function()
      local mta, port = start()
      local p = assert(H.connect(port, nil, nil, "127.0.0.2"))
      p:script("S: 220\nC: EHLO c.test\nS: 250\nC: MAIL FROM:<a@c.test>\nS: 250\nC: RCPT TO:<b@elsewhere.test>\nS: 250 2.1.5")
      p:close()
      H.stop_mta(mta)
      for _, c in ipairs({ { {}, 250 }, { { networks = { "::1/128" } }, 250 }, { { networks = { "2001:db8::/32",
        "127.0.0.0/8" } }, 554 } }) do
        mta, port = start({ accept = { listen = "[::1]:0", relay = c[1] } })
        p = assert(H.connect(port, "::1"))
        p:script("S: 220\nC: EHLO c.test\nS: 250\nC: MAIL FROM:<a@c.test>\nS: 250\nC: RCPT TO:<b@elsewhere.test>")
        p:expect(c[2])
        p:close()
        H.stop_mta(mta)
      end
    end)
  end)
end)

describe("tenants", function()
  it("by listener, and by header only where the listener allows it (removed from the stored message)", function()
    H.run(function()
      local dir = H.tmpdir()
      local port2
      local mta, port, got = start({ accept = { tenant = "acme" }, new = { spool = dir .. "/spool" },
        setup = function(mta)
          mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false, tenant = "acme",
            tenant_header = "X-Tenant", tls = tls_opts(), auth = { file = users_file(), failure_delay = 0 } })
        end })
      port2 = mta:addresses()[2].port
      local body = "X-Tenant: beta\r\nSubject: t\r\n\r\nbody\r\n"
      -- 1: the listener's tenant; the header means nothing here and stays
      assert.equal(250, (H.send(port, { body = body })))
      -- 2: the header listener: beta, and the field is gone
      assert.equal(250, (H.send(port2, { body = body })))
      -- 3: no header there: the listener's tenant
      assert.equal(250, (H.send(port2)))
      -- 4: a folded field, in any letter case
      assert.equal(250, (H.send(port2, { body = "Subject: t\r\nx-tenant:\r\n  gamma \r\n\r\nbody\r\n" })))
      -- refused: an unknown tenant, two fields
      local c, e, t = H.send(port2, { body = "X-Tenant: nope\r\n\r\nbody\r\n" })
      assert.same({ 550, "5.7.1", "Unknown tenant in X-Tenant" }, { c, e, t })
      c, e = H.send(port2, { body = "X-Tenant: beta\r\nX-Tenant: beta\r\n\r\nbody\r\n" })
      assert.same({ 550, "5.7.1" }, { c, e })
      -- an authenticated user's tenant cannot be changed by the header
      local p = tls_session(port2)
      login(p, "alice@acme.test", "alice-pw")
      c, e, t = send_message(p, "alice@acme.test", "x@elsewhere.test", body)
      assert.same({ 550, "5.7.1" }, { c, e })
      assert.truthy(t:find("does not match the tenant of the authenticated user", 1, true), t)
      assert.equal(250, (send_message(p, "alice@acme.test", "x@elsewhere.test",
        "X-Tenant: acme\r\nSubject: t\r\n\r\nbody\r\n")))
      p:close()
      assert.equal(5, #got)
      assert.truthy(got[1].text:find("\r\nX-Tenant: beta\r\n", 1, true))
      assert.is_nil(got[2].text:lower():find("x-tenant", 1, true), got[2].text)
      assert.truthy(got[2].text:find("\r\nSubject: t\r\n\r\nbody\r\n$"), got[2].text)
      assert.is_nil(got[4].text:lower():find("x-tenant", 1, true), got[4].text)
      assert.truthy(got[4].text:find("\r\nSubject: t\r\n\r\nbody", 1, true), got[4].text)
      assert.is_nil(got[5].text:lower():find("x-tenant", 1, true))
      H.stop_mta(mta)
      assert.same({ "acme", "beta", "acme", "gamma", "acme" }, spooled(dir .. "/spool"))
      H.rm_rf(dir)
    end)
  end)

  it("per-tenant message rate: A over its rate gets 452 4.7.0 at MAIL while B is accepted", function()
    H.run(function()
      local mta, port = start({ accept = { tenant = "acme" },
        new = { tenants = tenants({ acme = { max_messages = "4/s" } }) },
        setup = function(mta)
          mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false, tenant = "beta" })
        end })
      local portb = mta:addresses()[2].port
      local pa, pb = assert(H.connect(port)), assert(H.connect(portb))
      pa:script("S: 220\nC: EHLO a.test\nS: 250")
      pb:script("S: 220\nC: EHLO b.test\nS: 250")
      local a_ok, a_refused, b_ok = 0, 0, 0
      local t0 = uv.now()
      for _ = 1, 10 do
        local c, e, t = send_message(pa, "a@a.test", "x@elsewhere.test")
        if c == 250 then
          a_ok = a_ok + 1
        else
          assert.same({ 452, "4.7.0", "Tenant message rate exceeded, try again later" }, { c, e, t })
          a_refused = a_refused + 1
        end
        if send_message(pb, "b@b.test", "x@elsewhere.test") == 250 then b_ok = b_ok + 1 end
      end
      local elapsed = (uv.now() - t0) / 1000
      assert.equal(10, b_ok)
      -- a burst of 4, plus what refilled at 4/s while the loop ran
      assert.truthy(a_ok >= 4 and a_ok <= 4 + math.floor(elapsed * 4) + 1,
        string.format("%d accepted in %.2f s", a_ok, elapsed))
      assert.truthy(a_refused >= 3, a_refused)
      assert.equal(10 - a_ok, a_refused)
      -- it is a rate: tokens come back
      require("moonpost").sleep(0.6)
      assert.equal(250, (send_message(pa, "a@a.test", "x@elsewhere.test")))
      pa:close()
      pb:close()
      H.stop_mta(mta)
    end)
  end)

  it("per-tenant queue quota: 452 4.3.1 at MAIL and RCPT, and at the end of data for a header tenant; A only", function()
    H.run(function()
      local dir = H.tmpdir()
      -- a spool and no transport: what is accepted stays queued
      local mta, port = start({ accept = { tenant = "acme" },
        new = { spool = dir .. "/spool", tenants = tenants({ acme = { max_queued = 2 }, gamma = { max_queued = 1 } }) },
        setup = function(mta)
          mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false, tenant = "beta" })
          mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false, tenant = "acme",
            tenant_header = "X-Tenant" })
        end })
      local portb, porth = mta:addresses()[2].port, mta:addresses()[3].port
      assert.equal(250, (H.send(port)))
      assert.equal(1, mta:tenant_depth("acme"))
      -- a transaction opened below the quota ...
      local p = assert(H.connect(port))
      p:script("S: 220\nC: EHLO a.test\nS: 250\nC: MAIL FROM:<a@a.test>\nS: 250 2.1.0\nC: RCPT TO:<one@elsewhere.test>\nS: 250")
      assert.equal(250, (H.send(port)))
      assert.equal(2, mta:tenant_depth("acme"))
      -- ... gets no more recipients once the quota is reached
      p:script("C: RCPT TO:<two@elsewhere.test>\nS: 452 4.3.1 Tenant queue quota exceeded")
      p:close()
      local c, e, t = H.send(port)
      assert.same({ 452, "4.3.1", "Tenant queue quota exceeded, try again later" }, { c, e, t })
      -- B is not affected
      for _ = 1, 3 do assert.equal(250, (H.send(portb))) end
      assert.equal(3, mta:tenant_depth("beta"))
      -- on a listener with a tenant header, the final tenant's quota, at the end of the data:
      -- acme's own mail is refused there, not at MAIL or RCPT ...
      p = assert(H.connect(porth))
      p:script("S: 220\nC: EHLO a.test\nS: 250\nC: MAIL FROM:<a@a.test>\nS: 250\nC: RCPT TO:<x@elsewhere.test>\nS: 250"
        .. "\nC: DATA\nS: 354\nC: Subject: acme\nC: \nC: body\nC: .\nS: 452 4.3.1 Tenant queue quota exceeded")
      p:close()
      -- ... and gamma's mail is not refused for acme's quota, but for its own
      local gamma = "X-Tenant: gamma\r\n\r\nbody\r\n"
      assert.equal(250, (H.send(porth, { body = gamma })))
      assert.equal(1, mta:tenant_depth("gamma"))
      c, e = H.send(porth, { body = gamma })
      assert.same({ 452, "4.3.1" }, { c, e })
      assert.equal(2, mta:tenant_depth("acme"))
      H.stop_mta(mta)
      -- a listener without a tenant of its own
      mta, port = start({ accept = { tenant_header = "X-Tenant" }, new = { spool = dir .. "/spool2",
        tenants = tenants({ gamma = { max_queued = 1 } }) } })
      assert.equal(250, (H.send(port, { body = gamma })))
      c, e = H.send(port, { body = gamma })
      assert.same({ 452, "4.3.1" }, { c, e })
      assert.equal(250, (H.send(port, { body = "X-Tenant: beta\r\n\r\nbody\r\n" })))
      H.stop_mta(mta)
      H.rm_rf(dir)
    end)
  end)

  it("a header tenant spends its own message rate, not the listener tenant's, and gets its own refusal", function()
    H.run(function()
      local mta, port = start({ accept = { tenant = "acme", tenant_header = "X-Tenant" },
        new = { tenants = tenants({ acme = { max_messages = { rate = "2/h", burst = 2 } },
          gamma = { max_messages = { rate = "1/h", burst = 1 } } }) } })
      local BETA = "X-Tenant: beta\r\n\r\nbody\r\n"
      local GAMMA = "X-Tenant: gamma\r\n\r\nbody\r\n"
      for _ = 1, 3 do assert.equal(250, (H.send(port, { body = BETA }))) end
      assert.equal(250, (H.send(port, { body = GAMMA })))
      -- gamma is over its rate: the reply is gamma's, at the end of the data
      local c, e, t = H.send(port, { body = GAMMA })
      assert.same({ 452, "4.7.0", "Tenant message rate exceeded, try again later" }, { c, e, t })
      -- acme's two tokens are all there
      assert.equal(250, (H.send(port)))
      assert.equal(250, (H.send(port)))
      c, e = H.send(port)
      assert.same({ 452, "4.7.0" }, { c, e })
      H.stop_mta(mta)
    end)
  end)

  it("per-tenant connections: 421 4.7.0 at connect for a listener's tenant, and at AUTH for a user's", function()
    H.run(function()
      local mta, port = start({ accept = { tenant = "gamma" },
        new = { tenants = tenants({ gamma = { max_connections = 2 }, acme = { max_connections = 1 } }) },
        setup = function(mta)
          mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false, tls = tls_opts(),
            auth = { file = users_file() } })
        end })
      local port2 = mta:addresses()[2].port
      local a, b = assert(H.connect(port)), assert(H.connect(port))
      a:expect(220)
      b:expect(220)
      local c = assert(H.connect(port))
      c:expect(421, "4.7.0", "too many connections for this tenant")
      assert.is_true(c:closed(5))
      c:close()
      a:close()
      assert.truthy(H.wait_for(function() return mta.tenants:connections("gamma") == 1 end, 5))
      c = assert(H.connect(port))
      c:expect(220)
      c:close()
      b:close()
      -- a user's tenant is counted from AUTH on; the other tenants go on
      local p1 = tls_session(port2)
      login(p1, "alice@acme.test", "alice-pw")
      local p2 = tls_session(port2)
      p2:cmd("AUTH PLAIN " .. plain("alice@acme.test", "alice-pw"))
      p2:expect(421, "4.7.0", "too many connections for this tenant")
      assert.is_true(p2:closed(5))
      p2:close()
      local p3 = tls_session(port2)
      login(p3, "bob@beta.test", "bob-pw")
      p3:close()
      p1:close()
      assert.truthy(H.wait_for(function() return mta.tenants:connections("acme") == 0 end, 5))
      H.stop_mta(mta)
    end)
  end)
end)
