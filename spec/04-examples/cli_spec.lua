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
