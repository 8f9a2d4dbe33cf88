-- The launcher: `moonpost check` reports mistakes with the policy's file,
-- line and field and starts nothing; `moonpost run` exits non-zero on them.
local H = require "helpers"

local MOONPOST = H.root .. "/scripts/moonpost"
local P = "spec/fixtures/policies/"

local function moonpost(...)
  return H.exec(MOONPOST, { ... }, { cwd = H.root, timeout = 30 })
end

describe("moonpost check", function()
  it("says ok for a valid policy, and opens no port", function()
    H.run(function()
      local code, out, err = moonpost("check", P .. "good.lua")
      assert.equal(0, code, err)
      assert.equal(P .. "good.lua: ok\n", out)
      assert.equal("", err)
    end)
  end)

  it("checks every shipped example", function()
    H.run(function()
      for _, f in ipairs(H.ls(H.root .. "/examples")) do
        if f:match("%.lua$") then
          local code, out, err = moonpost("check", "examples/" .. f)
          assert.equal(0, code, f .. ": " .. err)
          assert.equal("examples/" .. f .. ": ok\n", out)
        end
      end
    end)
  end)

  local cases = {
    { "bad_field.lua", "spec/fixtures/policies/bad_field.lua:3: accept.smtp: field 'max_recipients': expected a positive integer, got \"lots\"" },
    { "bad_typo.lua", "spec/fixtures/policies/bad_typo.lua:3: accept.smtp: unknown field 'max_recipents' (known: " },
    { "bad_event.lua", "spec/fixtures/policies/bad_event.lua:4: on(): unknown event 'smtp_server_rcpt'" },
    { "bad_syntax.lua", "spec/fixtures/policies/bad_syntax.lua:4: '}' expected (to close '{' at line 2) near 'log_level'" },
    { "bad_listen.lua", "spec/fixtures/policies/bad_listen.lua:3: accept.smtp: field 'listen' item 2: expected host:port" },
    { "bad_verdict.lua", "spec/fixtures/policies/bad_verdict.lua:3: moonpost.reject: code must be an integer from 500 to 599, got 450" },
    { "bad_huge_size.lua", "spec/fixtures/policies/bad_huge_size.lua:3: accept.smtp: field 'max_message_size': " },
    { "bad_relay_v6.lua", "spec/fixtures/policies/bad_relay_v6.lua:3: route.smtp: field 'relay' item 1: " },
    { "bad_use_module.lua", "spec/fixtures/policies/bad_use_module.lua:3: use(): " },
    { "bad_listen_twice.lua", "spec/fixtures/policies/bad_listen_twice.lua:3: accept.smtp: field 'listen': " },
    { "bad_extension.lua", "spec/fixtures/policies/bad_extension.lua:3: accept.smtp: field 'extensions': unknown extension 'pipelning'" },
  }
  for _, c in ipairs(cases) do
    it("reports " .. c[1] .. " at its file and line", function()
      H.run(function()
        local code, out, err = moonpost("check", P .. c[1])
        assert.equal(1, code)
        assert.equal("", out)
        assert.equal("moonpost: " .. c[2], err:sub(1, #c[2] + 10))
        -- no Lua traceback for a policy mistake
        assert.falsy(err:find("stack traceback", 1, true))
      end)
    end)
  end

  it("reports a missing file", function()
    H.run(function()
      local code, _, err = moonpost("check", "no/such/policy.lua")
      assert.equal(1, code)
      assert.equal("moonpost: no/such/policy.lua: cannot open file\n", err)
    end)
  end)
end)

describe("moonpost run", function()
  it("exits 1 with the same message for a bad policy", function()
    H.run(function()
      local code, _, err = moonpost("run", P .. "bad_field.lua")
      assert.equal(1, code)
      assert.matches("bad_field.lua:3: accept.smtp: field 'max_recipients'", err, nil, true)
    end)
  end)

  it("exits 1 naming the address when the port is taken", function()
    H.run(function()
      local dir = H.tmpdir()
      local srv = H.launch(H.root .. "/examples/quickstart.lua",
        { MOONPOST_MAILDIR = dir .. "/mail", MOONPOST_SPOOL = dir .. "/spool1" })
      local code, _, err = H.exec(MOONPOST, { "run", "examples/quickstart.lua" },
        { cwd = H.root, timeout = 30, env = { MOONPOST_LISTEN = "127.0.0.1:" .. srv.port,
          MOONPOST_SPOOL = dir .. "/spool2" } })
      assert.equal(1, code)
      assert.matches("cannot listen on 127.0.0.1:" .. srv.port .. ": EADDRINUSE", err, nil, true)
      assert.equal(0, srv.stop())
      H.rm_rf(dir)
    end)
  end)

  it("stops on SIGTERM and SIGINT with status 0", function()
    H.run(function()
      local dir = H.tmpdir()
      for _, sig in ipairs({ "sigterm", "sigint" }) do
        local srv = H.launch(H.root .. "/examples/quickstart.lua",
          { MOONPOST_MAILDIR = dir .. "/mail", MOONPOST_SPOOL = dir .. "/spool" })
        assert.equal(0, srv.stop(sig))
        assert.matches(sig .. ": stopping", srv.log(), nil, true)
      end
      H.rm_rf(dir)
    end)
  end)

  it("prints usage and exits 2 without a command", function()
    H.run(function()
      local code, _, err = moonpost()
      assert.equal(2, code)
      assert.matches("usage: moonpost run POLICY.lua", err, nil, true)
      code = moonpost("frobnicate")
      assert.equal(2, code)
    end)
  end)

  it("prints its version", function()
    H.run(function()
      local code, out = moonpost("version")
      assert.equal(0, code)
      assert.matches("^moonpost %d+%.%d+%.%d+ %(LuaJIT 2%.1", out)
    end)
  end)
end)

describe("examples/relay.lua", function()
  it("relays what it receives to MOONPOST_RELAY", function()
    H.run(function()
      local sink = H.sink()
      local dir = H.tmpdir("moonpost-relay")
      local srv = H.launch(H.root .. "/examples/relay.lua", { MOONPOST_SPOOL = dir .. "/spool",
        MOONPOST_RELAY = "127.0.0.1:" .. sink.port })
      local code, out = H.exec("swaks", { "--server", "127.0.0.1:" .. srv.port, "--to", "far@away.test",
        "--from", "me@here.test", "--header", "Subject: relayed" }, { timeout = 30 })
      local delivered = H.wait_for(function() return #sink.messages() == 1 end, 20)
      srv.stop()
      local msgs = sink.messages()
      sink.stop()
      H.rm_rf(dir)
      assert.equal(0, code, out)
      assert.is_true(delivered)
      assert.same({ "far@away.test" }, msgs[1].rcpts)
      assert.equal("me@here.test", msgs[1].from)
      assert.truthy(msgs[1].data:find("Subject: relayed", 1, true))
    end)
  end)
end)

describe("examples/relay.lua with TLS and DKIM", function()
  it("takes STARTTLS from swaks, signs with MOONPOST_DKIM_DIR and relays over TLS", function()
    H.run(function()
      local d = H.certs()
      local sink = H.sink({ "--tls", d .. "/self.pem", d .. "/self.key" })
      local dir = H.tmpdir("moonpost-relay")
      local kcode, record = H.exec(H.root .. "/scripts/dkim-keygen", { "--type", "ed25519", "--domain",
        "here.test", "--selector", "s1", "--dir", dir .. "/dkim" })
      assert.equal(0, kcode)
      local txt = {}
      for part in record:gmatch('"([^"]*)"') do txt[#txt + 1] = part end
      local srv = H.launch(H.root .. "/examples/relay.lua", { MOONPOST_SPOOL = dir .. "/spool",
        MOONPOST_RELAY = "127.0.0.1:" .. sink.port, MOONPOST_TLS_CERT = d .. "/mx.pem",
        MOONPOST_TLS_KEY = d .. "/mx.key", MOONPOST_DKIM_DIR = dir .. "/dkim" })
      local code, out = H.exec("swaks", { "--server", "127.0.0.1:" .. srv.port, "--tls", "--to", "far@away.test",
        "--from", "me@here.test", "--header", "Subject: signed and sealed" }, { timeout = 30 })
      local delivered = H.wait_for(function() return #sink.messages() == 1 end, 20)
      srv.stop()
      local msgs = sink.messages()
      sink.stop()
      H.rm_rf(dir)
      assert.equal(0, code, out)
      assert.is_true(delivered)
      assert.equal("TLSv1.3", msgs[1].tls)
      local data = msgs[1].data
      assert.truthy(data:find("(using TLSv1.3 with cipher", 1, true))
      local vcode, vout, verr = H.exec(H.python, { "-c", [[
import sys, dkim
txt = sys.argv[1].encode()
ok = dkim.verify(sys.stdin.buffer.read(), dnsfunc=lambda name, timeout=5: txt)
print("pass" if ok else "fail")
]], table.concat(txt) }, { stdin = data })
      assert.equal(0, vcode, verr)
      assert.equal("pass\n", vout)
    end)
  end)
end)

describe("moonpost spool list", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-spool-list") end)
  after_each(function() H.rm_rf(dir) end)

  -- a spool with one queued message from a client, made by a real run
  local function spool_with(from, rcpt)
    local srv = H.launch(H.root .. "/spec/fixtures/policies/spool_only.lua", { MOONPOST_SPOOL = dir .. "/spool" })
    local p = assert(H.connect(srv.port))
    p:script([[
      S: 220
      C: EHLO client.test
      S: 250
    ]])
    p:cmd("MAIL FROM:<" .. from .. "> SMTPUTF8")
    p:expect(250)
    p:cmd("RCPT TO:<" .. rcpt .. ">")
    p:expect(250)
    p:script([[
      C: DATA
      S: 354
      C: Subject: hi
      C:
      C: hi
      C: .
      S: 250
      C: QUIT
      S: 221
    ]])
    p:close()
    assert.equal(0, srv.stop())
  end

  it("escapes the control characters of a client's addresses, as ctl does", function()
    H.run(function()
      -- U+009B is CSI, a C1 control: a UTF-8 address may hold it (SMTPUTF8)
      spool_with("a\194\155" .. "31mred@client.test", "b\194\155" .. "2J@example.com")
      local code, out, err = moonpost("spool", "list", dir .. "/spool")
      assert.equal(0, code, err)
      assert.is_nil(out:find("\194[\128-\159]"), out)
      assert.matches("<a\\u009b31mred@client.test>  <b\\u009b2J@example.com>", out, nil, true)
      assert.matches("\n1 queued\n$", out)
      -- --json gives the octets as they are
      code, out = moonpost("spool", "list", dir .. "/spool", "--json")
      assert.equal(0, code)
      assert.equal("a\194\155" .. "31mred@client.test", require("cjson").decode(out).messages[1].from)
    end)
  end)

  it("fails, rather than listing nothing, when the segments cannot be read", function()
    H.run(function()
      spool_with("a@client.test", "b@example.com")
      -- another user may enter the spool directory but not read seg/
      assert.equal(0, (H.exec("chmod", { "711", dir, dir .. "/spool" })))
      assert.equal(0, (H.exec("chmod", { "700", dir .. "/spool/seg" })))
      local code, out, err = H.exec("setpriv", { "--reuid=nobody", "--regid=nogroup", "--clear-groups", MOONPOST,
        "spool", "list", dir .. "/spool" }, { cwd = "/", timeout = 30 })
      assert.equal(1, code, out)
      assert.equal("", out)
      assert.matches("^moonpost: spool: cannot read " .. dir:gsub("%p", "%%%0") .. "/spool/seg: EACCES", err)
      -- nor may it enter the spool: not "no spool at" it
      assert.equal(0, (H.exec("chmod", { "700", dir .. "/spool" })))
      code, out, err = H.exec("setpriv", { "--reuid=nobody", "--regid=nogroup", "--clear-groups", MOONPOST,
        "spool", "list", dir .. "/spool" }, { cwd = "/", timeout = 30 })
      assert.equal(1, code, out)
      assert.matches("^moonpost: spool: cannot read " .. dir:gsub("%p", "%%%0") .. "/spool/seg: EACCES", err)
      -- seg/ that is a file is no spool
      H.rm_rf(dir .. "/spool/seg")
      H.write(dir .. "/spool/seg", "")
      code, out, err = moonpost("spool", "list", dir .. "/spool")
      assert.equal(1, code, out)
      assert.equal("moonpost: spool: no spool at " .. dir .. "/spool\n", err)
    end)
  end)

  it("exits 2 with the usage text for arguments after --json", function()
    H.run(function()
      spool_with("a@client.test", "b@example.com")
      local code, out, err = moonpost("spool", "list", dir .. "/spool", "--json", "extra")
      assert.equal(2, code)
      assert.equal("", out)
      assert.matches("usage: moonpost run POLICY.lua", err, nil, true)
    end)
  end)
end)

describe("moonpost passwd", function()
  local function passwd(args, stdin)
    table.insert(args, 1, "passwd")
    return H.exec(MOONPOST, args, { cwd = H.root, timeout = 60, stdin = stdin })
  end

  it("refuses costs out of range as a bad option, before reading the password, without a traceback", function()
    H.run(function()
      for _, args in ipairs({ { "--ln", "64" }, { "--ln", "31" }, { "--r", "1025" }, { "--p", "100000" },
          { "--ln", "20", "--r", "1024" }, { "--iterations", "999" }, { "--iterations", "100000001" } }) do
        local what = table.concat(args, " ")
        -- no password on standard input: the options are refused first
        local code, out, err = passwd(args, "")
        assert.equal(2, code, what .. ": " .. err)
        assert.equal("", out, what)
        assert.is_nil(err:find("traceback", 1, true), what .. ": " .. err)
        assert.matches("\nmoonpost: passwd: ", err, nil, true)
      end
      local code, out, err = passwd({ "--ln", "20", "--r", "1024" }, "pw\n")
      assert.equal(2, code, err)
      assert.equal("", out)
      assert.matches("moonpost: passwd: scrypt: parameters need more than 1024 MiB\n$", err)
      -- the limits themselves are fine
      code, out, err = passwd({ "--ln", "1", "--r", "1", "--p", "1" }, "pw\n")
      assert.equal(0, code, err)
      assert.matches("^%$scrypt%$ln=1,r=1,p=1%$", out)
      code, out, err = passwd({ "--iterations", "1000" }, "pw\n")
      assert.equal(0, code, err)
      assert.matches("^%$pbkdf2%-sha256%$1000%$", out)
    end)
  end)
end)
