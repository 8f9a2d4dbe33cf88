-- `moonpost ctl` against a launched `scripts/moonpost run`: every command
-- over the HTTP API, what reaches the aiosmtpd sink, exit codes and errors.
local H = require "helpers"
local cjson = require "cjson"

local MOONPOST = H.root .. "/scripts/moonpost"
local TOKEN = "ctl-token"

-- launch(policy, sink, dir, env) -> the process and the port of its HTTP listener
local function launch(policy, sink, dir, env)
  local e = { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_RELAY = "127.0.0.1:" .. sink.port,
    MOONPOST_API_TOKEN = TOKEN }
  for k, v in pairs(env or {}) do e[k] = v end
  local srv = H.launch(policy, e)
  local port
  H.wait_for(function()
    port = srv.log():match("listening http 127%.0%.0%.1:(%d+)")
    return port ~= nil
  end, 10)
  assert(port, "no http listener in the log: " .. srv.log())
  return srv, port
end

-- ctl(port, ...) -> exit code, stdout, stderr (the URL and token from the environment)
local function ctl_at(port)
  return function(...)
    return H.exec(MOONPOST, { "ctl", ... }, { cwd = H.root, timeout = 60,
      env = { MOONPOST_HTTP = "127.0.0.1:" .. port, MOONPOST_API_TOKEN = TOKEN } })
  end
end

local function arrived(sink, rcpt)
  for _, m in ipairs(sink.messages()) do
    if m.rcpts[1] == rcpt then return m end
  end
end

describe("moonpost ctl", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-ctl") end)
  after_each(function() H.rm_rf(dir) end)

  it("drives examples/relay.lua: health, inject, suspend, inspect, queues, resume, bounce, reload", function()
    H.with_sink(function(sink)
      local srv, port = launch(H.root .. "/examples/relay.lua", sink, dir)
      local ctl = ctl_at(port)
      local ok, err = pcall(function()
        local _
        local code, out, e = ctl("health")
        assert.equal(0, code, e)
        assert.equal("alive, ready\n", out)
        -- a wrong token: exit 1 with the API's reason
        code, out, e = H.exec(MOONPOST, { "ctl", "--url", "http://127.0.0.1:" .. port, "--token", "nope", "queues" },
          { timeout = 30 })
        assert.equal(1, code)
        assert.equal("", out)
        assert.matches("^moonpost: ctl: 401 Unauthorized: a valid bearer token is required\n$", e)
        -- the URL: an address (or localhost) and a port, over http; without
        -- a scheme as in MOONPOST_HTTP
        code, out, e = H.exec(MOONPOST, { "ctl", "--url", "localhost:" .. port, "health" }, { timeout = 30 })
        assert.equal(0, code, e)
        assert.equal("alive, ready\n", out)
        code, _, e = H.exec(MOONPOST, { "ctl", "--url", "https://127.0.0.1:" .. port, "health" }, { timeout = 30 })
        assert.equal(2, code)
        assert.matches("https is not supported", e)
        code, _, e = H.exec(MOONPOST, { "ctl", "--url", "mail.example:8025", "health" }, { timeout = 30 })
        assert.equal(2, code)
        assert.matches("bad URL mail%.example:8025: the host must be an IP address or localhost", e)
        -- usage mistakes: exit 2
        code, _, e = ctl("frobnicate")
        assert.equal(2, code)
        assert.matches("unknown command frobnicate", e)
        code, _, e = ctl("suspend")
        assert.equal(2, code)
        assert.matches("suspend needs %-%-tenant, %-%-domain and/or %-%-site", e)

        code, out, e = ctl("suspend", "--domain", "held.test", "--reason", "maintenance")
        assert.equal(0, code, e)
        assert.equal("suspended domain=held.test\n", out)
        H.write(dir .. "/report.csv", "a,b\n1,2\n")
        code, out, e = ctl("inject", "--from", "ops@origin.test", "--to", "user@held.test", "--subject", "Grüße",
          "--text", "plain words", "--html", "<p>html words</p>", "--attach", dir .. "/report.csv",
          "--header", "X-Campaign: ctl")
        assert.equal(0, code, e)
        local id = out:match("^queued (%x+)\n$")
        assert.truthy(id, out)
        H.wait_for(function() return false end, 1)
        code, out, e = ctl("inspect", id)
        assert.equal(0, code, e)
        assert.matches("state:%s+suspended %(domain=held%.test%)", out)
        assert.matches("user@held%.test%s+pending", out)
        assert.matches("\nSubject: =%?UTF%-8%?B%?", out)
        code, out = ctl("inspect", id, "--json")
        assert.equal(0, code)
        assert.equal(0, cjson.decode(out).attempts)
        code, out = ctl("queues")
        assert.equal(0, code)
        assert.matches("1 messages queued", out)
        assert.matches("\n%-%s+held%.test%s+1%s+%d+s", out)
        assert.matches("domain=held%.test%s+%S+%s+1%s+maintenance", out)
        code, out = ctl("suspensions")
        assert.equal(0, code)
        assert.matches("domain=held%.test", out)
        assert.equal(0, #sink.messages())
        code, out, e = ctl("resume", "--domain", "held.test")
        assert.equal(0, code, e)
        assert.equal("resumed domain=held.test; 1 messages released\n", out)
        assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
        local m = sink.messages()[1]
        assert.matches("\r\nX%-Campaign: ctl\r\n", m.data)
        assert.matches('filename="report%.csv"', m.data)
        assert.matches("Content%-Type: text/csv", m.data)

        -- a deferred message (451 at the sink, retried in 5 minutes) purged with a DSN
        code, out = ctl("inject", "--from", "ops@origin.test", "--to", "r451-x@slow.test", "--subject", "slow",
          "--text", "x")
        assert.equal(0, code)
        id = out:match("^queued (%x+)")
        assert.is_true(H.wait_for(function()
          local _, o = ctl("inspect", id, "--json")
          return cjson.decode(o).attempts == 1
        end, 10))
        code, out, e = ctl("bounce", "--domain", "slow.test")
        assert.equal(0, code, e)
        assert.equal("1 recipients in 1 messages matched: 1 bounced with DSN, 0 pending\n", out)
        assert.is_true(H.wait_for(function() return arrived(sink, "ops@origin.test") ~= nil end, 10))
        local d = H.parse_dsn(arrived(sink, "ops@origin.test").data)
        assert.equal("rfc822; r451-x@slow.test", d.recipients[1]["Final-Recipient"])
        code, _, e = ctl("inspect", id)
        assert.equal(1, code)
        assert.matches("^moonpost: ctl: 404 Not Found: no such message in the queue", e)

        -- no suppress block in this policy: the API says so, ctl exits 1
        code, _, e = ctl("suppress", "list")
        assert.equal(1, code)
        assert.matches("404 Not Found: the policy uses no moonpost.suppress block", e, nil, true)

        -- a suspension, and the mail it holds, carry over a reload of the policy
        code = ctl("suspend", "--domain", "late.test")
        assert.equal(0, code)
        code = ctl("inject", "--from", "ops@origin.test", "--to", "u@late.test", "--subject", "late", "--text", "x")
        assert.equal(0, code)
        local function held()
          local _, o = ctl("suspensions", "--json")
          local list = cjson.decode(o).suspensions
          return #list == 1 and list[1].held == 1
        end
        assert.is_true(H.wait_for(held, 10))
        code, out, e = ctl("reload")
        assert.equal(0, code, e)
        assert.matches("reloaded", out)
        assert.is_true(held())
        code, out = ctl("resume", "--domain", "late.test")
        assert.equal(0, code)
        assert.equal("resumed domain=late.test; 1 messages released\n", out)
        assert.is_true(H.wait_for(function() return arrived(sink, "u@late.test") ~= nil end, 10))
        code, out = ctl("queues", "--json")
        assert.equal(0, code)
        assert.equal(0, cjson.decode(out).messages)
      end)
      srv.stop()
      if not ok then error(tostring(err) .. "\n" .. srv.log(), 0) end
    end, 120)
  end)

  it("manages suppressions: add, list, export as CSV, remove", function()
    H.with_sink(function(sink)
      local srv, port = launch(H.root .. "/spec/fixtures/policies/ctl_suppress.lua", sink, dir,
        { MOONPOST_SUPPRESS = dir .. "/suppress.log" })
      local ctl = ctl_at(port)
      local ok, err = pcall(function()
        local _
        local code, out, e = ctl("suppress", "add", "--tenant", "acme", "--reason", "complaint", "a@x.test",
          "b@x.test", "c@x.test")
        assert.equal(0, code, e)
        assert.equal("3 added, 0 there already\n", out)
        code = ctl("suppress", "add", "--tenant", "globex", "a@x.test")
        assert.equal(0, code)
        code, out = ctl("suppress", "list", "--tenant", "acme", "--limit", "2")
        assert.equal(0, code)
        assert.matches("^TENANT%s+ADDRESS%s+REASON%s+SINCE\n", out)
        assert.matches("acme%s+%S+@x%.test%s+complaint", out)
        assert.matches("\n2 of 3 %(next: %-%-offset 2%)\n$", out)
        code, out = ctl("suppress", "export", "--tenant", "globex")
        assert.equal(0, code)
        assert.matches("^tenant,address,reason,time\nglobex,a@x%.test,admin,%d+\n$", out)
        -- a suppressed recipient of acme is left out of injected mail
        code, out = ctl("inject", "--from", "n@acme.test", "--to", "b@x.test", "--to", "ok@x.test", "--tenant", "acme",
          "--subject", "s", "--text", "t")
        assert.equal(0, code)
        assert.matches("^queued %x+\nrefused <b@x%.test>: 550 5%.7%.1 b@x%.test is on the suppression list\n$", out)
        assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
        assert.same({ "ok@x.test" }, sink.messages()[1].rcpts)
        code, out = ctl("suppress", "remove", "--tenant", "acme", "b@x.test", "zz@x.test")
        assert.equal(0, code)
        assert.equal("1 removed, 1 not there\n", out)
        code, out = ctl("suppress", "list", "--json")
        assert.equal(0, code)
        assert.equal(3, cjson.decode(out).total)
        -- what anyone may send (header fields, a body, a suppression's reason)
        -- reaches the terminal with its control characters escaped
        code, _, e = ctl("suppress", "add", "--tenant", "acme", "--reason", "bad\27[2Jreason\27]0;x\7", "e@x.test")
        assert.equal(0, code, e)
        code, out = ctl("suppress", "list", "--tenant", "acme")
        assert.equal(0, code)
        assert.is_nil(out:find("[%z\1-\8\11-\31\127]"))
        assert.matches("bad\\x1b[2Jreason\\x1b]0;x\\x07", out, nil, true)
        H.write(dir .. "/evil.eml", "From: n@acme.test\r\nSubject: hi\27[2J there\r\n"
          .. "X-Title: \27]0;pwned\7\r\n\r\nline one\r\n\27[31mred\r\n\194\155csi\r\n")
        code, out, e = ctl("inject", "--from", "n@acme.test", "--to", "r451-t@x.test", "--tenant", "acme",
          "--content-file", dir .. "/evil.eml")
        assert.equal(0, code, e)
        local id = out:match("^queued (%x+)")
        code, out, e = ctl("inspect", id, "--body")
        assert.equal(0, code, e)
        assert.is_nil(out:find("\27", 1, true))
        assert.is_nil(out:find("[%z\1-\8\11-\31\127]"))
        assert.is_nil(out:find("\194[\128-\159]"))
        assert.matches("\nSubject: hi\\x1b[2J there\n", out, nil, true)
        assert.matches("\nX-Title: \\x1b]0;pwned\\x07\n", out, nil, true)
        assert.matches("\nline one\n\\x1b[31mred\n\\u009bcsi\n", out, nil, true)
        -- --json is the API's answer as it came
        code, out = ctl("inspect", id, "--json")
        assert.equal(0, code)
        assert.equal("hi\27[2J there", (function()
          for _, h in ipairs(cjson.decode(out).headers) do if h.name == "Subject" then return h.value end end
        end)())
        -- a tenant the policy does not declare
        code, _, e = ctl("inject", "--from", "n@x.test", "--to", "y@x.test", "--tenant", "initech", "--text", "t")
        assert.equal(1, code)
        assert.matches("400 Bad Request: tenant: unknown tenant 'initech'", e, nil, true)
      end)
      srv.stop()
      if not ok then error(tostring(err) .. "\n" .. srv.log(), 0) end
    end, 120)
  end)
end)

describe("moonpost ctl against a server that answers oddly", function()
  -- api(body) -> server, port: answers every request with 200 and body
  local function api(body)
    return H.listen(function(c)
      local got = ""
      c:read_start(function(_, chunk)
        if not chunk then return c:close() end
        got = got .. chunk
        if got:find("\r\n\r\n", 1, true) then
          c:read_stop()
          c:write("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #body
            .. "\r\nConnection: close\r\n\r\n" .. body, function() c:close() end)
        end
      end)
    end)
  end

  it("says the answer is not what it expected, in one line, rather than raising a Lua error", function()
    H.run(function()
      for _, c in ipairs({
        { '{"messages":"many","queues":{"a":1},"sites":5}', { "queues" } },
        { '{"id":"x","recipients":[]}', { "inspect", "x" } },
        { '{"ok":true}', { "suspend", "--domain", "d.test" } },
        { '{"resumed":[1,{"a":2}]}', { "resume", "--all" } },
        { '{"entries":[],"count":"some"}', { "suppress", "list" } },
      }) do
        local server, port = api(c[1])
        local args = { "ctl", "--url", "127.0.0.1:" .. port }
        for _, a in ipairs(c[2]) do args[#args + 1] = a end
        local code, _, err = H.exec(MOONPOST, args, { timeout = 30 })
        server:close()
        local what = table.concat(c[2], " ") .. " -> " .. c[1]
        assert.equal(1, code, what .. ": " .. err)
        assert.is_nil(err:find("traceback", 1, true), what .. ": " .. err)
        assert.matches("^moonpost: ctl: unexpected answer from 127%.0%.0%.1:" .. port .. " to [%u]+ /api/v1/[^\n]*\n$",
          err)
      end
    end)
  end)

  it("takes --timeout nan as a usage mistake", function()
    H.run(function()
      local code, _, err = H.exec(MOONPOST, { "ctl", "--url", "127.0.0.1:1", "--timeout", "nan", "queues" },
        { timeout = 30 })
      assert.equal(2, code, err)
      assert.matches("^moonpost: ctl: %-%-timeout needs a number of seconds\n", err)
    end)
  end)
end)
