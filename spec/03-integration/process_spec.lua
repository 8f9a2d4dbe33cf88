-- The process (issue 7, item 4), with real processes of scripts/moonpost:
-- SIGTERM stops accepting, lets transactions and deliveries finish, syncs
-- the spool and exits 0, and nothing that got a 250 is lost; SIGHUP runs the
-- policy file again (new sessions get the new policy, sessions in progress
-- keep the old one, a policy that fails to load changes nothing); the log is
-- JSON on request.
local H = require "helpers"
local uv = require "luv"
local sched = require "moonpost.runtime.sched"
local cjson = require "cjson"

local MOONPOST = H.root .. "/scripts/moonpost"

-- A policy file. o.listen: ports on 127.0.0.1; o.grace: stop_grace;
-- o.new: more options of moonpost.new (Lua source); o.extra: policy code
-- before run().
local function write_policy(path, o)
  local addrs = {}
  for i, p in ipairs(o.listen) do addrs[i] = string.format("%q", "127.0.0.1:" .. p) end
  H.write(path, string.format([[
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { hostname = "mx.test", spool = env.spool, stop_grace = %q%s }
mta:use(require("moonpost.accept").smtp { listen = { %s } })
mta:use(require("moonpost.maildir").deliver { root = env.maildir, fsync = false })
%s
mta:run()
]], o.grace or "10s", o.new and (", " .. o.new) or "", table.concat(addrs, ", "), o.extra or ""))
end

-- a policy hook that refuses one recipient domain
local function refuse(domain)
  return string.format([[
mta:on("smtp_server_rcpt_to", function(txn, rcpt)
  if rcpt.domain == %q then return moonpost.reject(550, "5.1.2", "%s is refused by this policy") end
end)]], domain, domain)
end

local function session(port)
  local p = assert(H.connect(port))
  p:script("S: 220\nC: EHLO client.test\nS: 250")
  return p
end

local function wait_log(srv, needle, n, timeout)
  return H.wait_for(function() return H.count(srv.log(), needle) >= (n or 1) end, timeout or 15)
end

-- Processes a test started are killed when it fails half-way (H.run_killing).
local launch, run = H.launch, H.run_killing

-- launch the policy with its spool and Maildir under dir, listening on port
local function launch_in(dir, policy, port)
  return launch(policy, { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail" }, { port = port })
end

-- seconds from now until the process has exited
local function wait_exit(srv, timeout)
  local t0 = uv.now()
  H.wait_for(function() return (srv.exited()) end, timeout)
  return (uv.now() - t0) / 1000
end

describe("SIGTERM", function()
  it("under load: exits 0 well within the grace period, and every message that got a 250 is delivered or queued",
    function()
    local dir = H.tmpdir("moonpost-term")
    run(function()
      local env = { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail" }
      uv.fs_mkdir(dir .. "/mail", 448)
      -- defer-* recipients cannot be delivered and stay queued
      H.write(dir .. "/mail/.blocked", "a file, so that defer-* folders cannot be made\n")
      local policy = H.root .. "/spec/fixtures/policies/crash.lua" -- stop_grace: the default 10 s
      local port = H.free_port()
      local srv = launch(policy, env, { port = port })
      local iopts = { port = port, sessions = 40, total = 1e9, rcpt = function(seq, tok)
        return (seq % 20 == 0) and ("defer-" .. tok .. "@x.test") or "sink@x.test"
      end }
      local inj = H.inject(iopts)
      assert.is_true(H.wait_for(function() return inj.nacked >= 2000 end, 60), "no load: " .. srv.log())
      -- one session between transactions, one in the middle of its message
      local idle = session(port)
      local busy = session(port)
      busy:script("C: MAIL FROM:<busy@c.test>\nS: 250\nC: RCPT TO:<sink@x.test>\nS: 250\nC: DATA\nS: 354")
      local t0 = uv.now()
      uv.kill(srv.pid, "sigterm")
      -- the idle one is told at once; the busy one finishes its message first
      idle:expect(421, "4.3.2", "Service shutting down")
      local idle_after = (uv.now() - t0) / 1000
      idle:close()
      busy:send("Subject: busy\r\n\r\nfinished while the server stops\r\n.\r\n")
      busy:expect(250, "2.0.0")
      busy:expect(421, "4.3.2", "Service shutting down")
      assert.is_true(busy:closed(5))
      busy:close()
      wait_exit(srv, 30)
      local took = (uv.now() - t0) / 1000
      local exited, code = srv.exited()
      assert.is_true(exited, "still running after " .. took .. " s")
      assert.equal(0, code)
      iopts.total = 0 -- the injector stops reconnecting
      assert.is_true(H.wait_for(function() return inj.running == 0 end, 30))
      local log1 = srv.log()
      assert.truthy(log1:find("sigterm: stopping (grace 10s)", 1, true), log1:sub(-2000))
      assert.truthy(log1:find("spool: closed", 1, true))
      assert.truthy(log1:find(" stopped\n", 1, true))
      assert.is_true(idle_after < 2, "421 to the idle session after " .. idle_after .. " s")
      -- the sessions and deliveries in progress ended well within the 10 s
      -- grace (bounds with room for a loaded machine: the point is that the
      -- grace was not waited out)
      assert.is_true(took < 8, "exit after " .. took .. " s")

      -- restart on the same spool: what was acknowledged is delivered, or queued
      local want = 1 -- the busy session's message
      for _, r in pairs(inj.acked) do if r == "sink@x.test" then want = want + 1 end end
      srv = launch(policy, env, { port = port })
      local function delivered() return #H.ls(dir .. "/mail/sink/new") end
      H.wait_for(function() return delivered() >= want end, 120)
      sched.sleep(0.5)
      assert.equal(0, srv.stop())
      local seen = {}
      for _, f in ipairs(H.ls(dir .. "/mail/sink/new")) do
        local tok = H.read(dir .. "/mail/sink/new/" .. f):match("\r\nSubject: ([%w%-]+)\r\n")
        seen[tok] = (seen[tok] or 0) + 1
      end
      local lcode, out, err = H.exec(MOONPOST, { "spool", "list", dir .. "/spool", "--json" })
      assert.equal(0, lcode, err)
      local queued = {}
      for _, m in ipairs(cjson.decode(out).messages) do queued[m.from:match("^(.-)@")] = true end
      local lost, dups = {}, 0
      for tok, rcpt in pairs(inj.acked) do
        if (rcpt == "sink@x.test" and not seen[tok]) or (rcpt ~= "sink@x.test" and not queued[tok]) then
          lost[#lost + 1] = tok
        end
      end
      if not seen.busy then lost[#lost + 1] = "busy" end
      for _, n in pairs(seen) do if n > 1 then dups = dups + n - 1 end end
      print(string.format("\nSIGTERM under load: %d acknowledged (%d sent), 421 to an idle session after %.3f s, "
        .. "exit 0 after %.2f s, %d lost, %d delivered twice", inj.nacked + 1, inj.sent + 1, idle_after, took, #lost,
        dups))
      assert.same({}, lost)
      -- a clean stop records every outcome: nothing is delivered again
      assert.equal(0, dups)
    end, 300)
    H.rm_rf(dir)
  end)

  it("closes a transaction that does not finish at stop_grace, and still exits 0", function()
    local dir = H.tmpdir("moonpost-term")
    run(function()
      local port = H.free_port()
      local policy = dir .. "/policy.lua"
      write_policy(policy, { listen = { port }, grace = "1.5s" })
      local srv = launch_in(dir, policy, port)
      local stuck = session(port)
      stuck:script("C: MAIL FROM:<slow@c.test>\nS: 250")
      local t0 = uv.now()
      uv.kill(srv.pid, "sigterm")
      -- refused at once: the listener is closed
      sched.sleep(0.2)
      assert.is_nil(H.connect(port, "127.0.0.1", 2))
      -- the open transaction may go on until the grace period ends
      stuck:expect(421, "4.3.2", "Service shutting down")
      local cut = (uv.now() - t0) / 1000
      wait_exit(srv, 10)
      local took = (uv.now() - t0) / 1000
      local exited, code = srv.exited()
      stuck:close()
      assert.is_true(exited)
      assert.equal(0, code)
      assert.is_true(cut >= 1.4 and cut < 4, "cut after " .. cut .. " s")
      assert.is_true(took < 6, "exit after " .. took .. " s")
      assert.truthy(srv.log():find("sigterm: stopping (grace 1.5s)", 1, true))
    end, 60)
    H.rm_rf(dir)
  end)

  it("SIGINT does the same", function()
    local dir = H.tmpdir("moonpost-term")
    run(function()
      local srv = launch(H.root .. "/examples/quickstart.lua",
        { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail" })
      local idle = session(srv.port)
      uv.kill(srv.pid, "sigint")
      idle:expect(421, "4.3.2")
      idle:close()
      wait_exit(srv, 10)
      local _, code = srv.exited()
      assert.equal(0, code)
      assert.truthy(srv.log():find("sigint: stopping", 1, true))
    end, 60)
    H.rm_rf(dir)
  end)
end)

describe("SIGHUP", function()
  it("reloads the policy: new sessions get the new one, a session in progress keeps the old one, "
    .. "no connection is refused, and added and removed addresses open and close", function()
    local dir = H.tmpdir("moonpost-hup")
    run(function()
      local p1, p2 = H.free_port(), H.free_port()
      local policy = dir .. "/policy.lua"
      write_policy(policy, { listen = { p1 } })
      local srv = launch_in(dir, policy, p1)
      -- a session from before the reload, in a transaction
      local old = session(p1)
      old:script("C: MAIL FROM:<old@c.test>\nS: 250")
      write_policy(policy, { listen = { p1, p2 }, extra = refuse("blocked.test") })
      -- connections during the reload: every one is answered
      local tried, refused, probing = 0, 0, true
      local probe = sched.spawn(function()
        while probing do
          tried = tried + 1
          local p = H.connect(p1, "127.0.0.1", 2)
          if p and p:reply() == 220 then
            p:cmd("QUIT")
            p:reply()
          else
            refused = refused + 1
          end
          if p then p:close() end
        end
      end)
      sched.sleep(0.1)
      uv.kill(srv.pid, "sighup")
      assert.is_true(wait_log(srv, "new sessions use it"), srv.log())
      sched.sleep(0.2)
      probing = false
      H.wait_for(function() return probe.done end, 5)
      assert.equal(0, refused)
      assert.is_true(tried > 5, tried .. " connections")

      -- the old session keeps the old policy until it ends, over two transactions
      old:script([[
        C: RCPT TO:<a@blocked.test>
        S: 250 2.1.5
        C: DATA
        S: 354
      ]])
      old:send("Subject: old\r\n\r\nunder the old policy\r\n.\r\n")
      old:expect(250, "2.0.0")
      old:script("C: MAIL FROM:<old@c.test>\nS: 250\nC: RCPT TO:<b@blocked.test>\nS: 250 2.1.5\nC: RSET\nS: 250")
      -- new sessions, on the address kept and on the new one, get the new policy
      for _, port in ipairs({ p1, p2 }) do
        local c, e, t = H.send(port, { to = "x@blocked.test" })
        assert.equal(550, c)
        assert.equal("5.1.2", e)
        assert.equal("blocked.test is refused by this policy", t)
        assert.equal(250, (H.send(port, { to = "ok@fine.test" })))
      end
      old:script("C: QUIT\nS: 221")
      old:close()
      assert.is_true(wait_log(srv, "the last session of the previous policy has ended"))

      -- a reload without the first address closes it; the second carries on
      write_policy(policy, { listen = { p2 }, extra = refuse("blocked.test") })
      uv.kill(srv.pid, "sighup")
      assert.is_true(wait_log(srv, "new sessions use it", 2), srv.log())
      assert.truthy(srv.log():find("reload: smtp 127.0.0.1:" .. p1 .. " closed", 1, true))
      assert.is_nil(H.connect(p1, "127.0.0.1", 2))
      assert.equal(550, (H.send(p2, { to = "y@blocked.test" })))
      assert.equal(250, (H.send(p2, { to = "ok@fine.test" })))

      -- the spool and the queue carried on: every accepted message is delivered
      assert.is_true(H.wait_for(function()
        return #H.ls(dir .. "/mail/a/new") == 1 and #H.ls(dir .. "/mail/ok/new") == 3
      end, 15))
      assert.equal(0, srv.stop())
      assert.is_nil(uv.fs_stat(dir .. "/mail/x"))
    end, 120)
    H.rm_rf(dir)
  end)

  it("keeps the old policy serving when the new one fails to load, and logs the file and line", function()
    local dir = H.tmpdir("moonpost-hup")
    run(function()
      local port = H.free_port()
      local policy = dir .. "/policy.lua"
      write_policy(policy, { listen = { port }, extra = refuse("v1.test") })
      local srv = launch_in(dir, policy, port)
      local function serves_v1()
        assert.equal(550, (H.send(port, { to = "a@v1.test" })))
        assert.equal(250, (H.send(port, { to = "a@v2.test" })))
      end
      serves_v1()
      local held = session(port)
      held:script("C: MAIL FROM:<held@c.test>\nS: 250")
      local n = 0
      local function hup(expect)
        n = n + 1
        uv.kill(srv.pid, "sighup")
        assert.is_true(wait_log(srv, "the old policy keeps serving", n), srv.log())
        local line = srv.log():match("[^\n]*" .. expect:gsub("%p", "%%%0") .. "[^\n]*")
        assert.truthy(line, "no log line with " .. expect .. ":\n" .. srv.log())
        return line
      end
      -- a syntax error
      H.write(policy, H.read(policy):gsub("mta:run%(%)", "mta:run(\nlocal = 1\n"))
      local line = hup(policy .. ":10:")
      assert.matches("error reload: " .. policy:gsub("%p", "%%%0") .. ":10: unexpected symbol near 'local'; "
        .. "the old policy keeps serving$", line)
      serves_v1()
      -- a configuration mistake, at the policy's line, naming the field
      write_policy(policy, { listen = { port }, extra = refuse("v2.test"), new = "log_level = \"loud\"" })
      hup(policy .. ":3: moonpost.new: field 'log_level'")
      serves_v1()
      -- an error raised by the policy's own code
      write_policy(policy, { listen = { port }, extra = "error('no database')" })
      hup(policy .. ":6: no database")
      serves_v1()
      -- a new address that cannot be opened
      local taken = uv.new_tcp()
      taken:bind("127.0.0.1", 0)
      taken:listen(1, function() end)
      local busy_port = taken:getsockname().port
      write_policy(policy, { listen = { port, busy_port }, extra = refuse("v2.test") })
      hup("cannot listen on 127.0.0.1:" .. busy_port .. ": EADDRINUSE")
      taken:close()
      serves_v1()
      -- a different spool directory needs a restart
      H.write(policy, H.read(policy):gsub("spool = env.spool", "spool = env.spool .. \"-other\""))
      hup("spool: the directory changed")
      serves_v1()
      assert.is_nil(uv.fs_stat(dir .. "/spool-other"))
      -- the session held across all of that is fine
      held:script("C: RCPT TO:<held@v2.test>\nS: 250\nC: QUIT\nS: 221")
      held:close()
      -- once the file is right, the reload takes
      write_policy(policy, { listen = { port }, extra = refuse("v2.test") })
      uv.kill(srv.pid, "sighup")
      assert.is_true(wait_log(srv, "new sessions use it"), srv.log())
      assert.equal(250, (H.send(port, { to = "b@v1.test" })))
      assert.equal(550, (H.send(port, { to = "b@v2.test" })))
      assert.equal(0, srv.stop())
    end, 120)
    H.rm_rf(dir)
  end)
end)

describe("the process log", function()
  local LEVELS = { error = true, warn = true, info = true, debug = true }

  local function records(text)
    local list = {}
    for line in text:gmatch("[^\n]+") do
      local ok, rec = pcall(cjson.decode, line)
      assert(ok and type(rec) == "table", "not a JSON object: " .. line)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", rec.time)
      assert.is_true(LEVELS[rec.level], line)
      assert.is_string(rec.message, line)
      list[#list + 1] = rec
    end
    return list
  end

  local function find(list, needle)
    for _, r in ipairs(list) do
      if r.message:find(needle, 1, true) then return r end
    end
  end

  it("is one JSON object per line with MOONPOST_LOG_FORMAT=json, with fields read from the message", function()
    local dir = H.tmpdir("moonpost-log")
    run(function()
      local srv = launch(H.root .. "/examples/quickstart.lua", { MOONPOST_SPOOL = dir .. "/spool",
        MOONPOST_MAILDIR = dir .. "/mail", MOONPOST_LOG_FORMAT = "json" })
      assert.equal(250, (H.send(srv.port, { to = "someone@example.test", from = "me@client.test" })))
      H.wait_for(function() return #H.ls(dir .. "/mail/someone/new") == 1 end, 10)
      uv.kill(srv.pid, "sighup")
      assert.is_true(wait_log(srv, "new sessions use it"))
      assert.equal(0, srv.stop())
      local list = records(srv.log())
      assert.is_true(#list >= 8, srv.log())
      local l = find(list, "listening smtp")
      assert.equal("info", l.level)
      local d = find(list, "delivered")
      assert.equal("someone@example.test", d.to)
      assert.matches("^%x+$", d.id)
      assert.equal("sighup", find(list, "sighup: reloading").component)
      assert.truthy(find(list, "stopped"))
    end, 60)
    H.rm_rf(dir)
  end)

  it("is JSON with moonpost.new { log_format = \"json\" }, and so is the error of a policy that fails", function()
    local dir = H.tmpdir("moonpost-log")
    run(function()
      local port = H.free_port()
      local policy = dir .. "/policy.lua"
      write_policy(policy, { listen = { port }, new = 'log_format = "json"' })
      local srv = launch_in(dir, policy, port)
      assert.equal(250, (H.send(port, {})))
      assert.equal(0, srv.stop())
      local list = records(srv.log())
      assert.truthy(find(list, "listening smtp 127.0.0.1:" .. port))
      -- a start that fails: the reason is a record too, and the exit status 1
      local taken = uv.new_tcp()
      taken:bind("127.0.0.1", 0)
      taken:listen(1, function() end)
      write_policy(policy, { listen = { taken:getsockname().port } })
      local code, out, err = H.exec(MOONPOST, { "run", policy }, { timeout = 30, env = {
        MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail", MOONPOST_LOG_FORMAT = "json" } })
      taken:close()
      assert.equal(1, code)
      assert.equal("", out)
      local e = find(records(err), "EADDRINUSE")
      assert.equal("error", e.level)
      assert.matches("^" .. policy:gsub("%p", "%%%0") .. ":7: cannot listen on 127%.0%.0%.1:%d+: EADDRINUSE", e.message)
    end, 60)
    H.rm_rf(dir)
  end)

  it("is human-readable by default", function()
    local dir = H.tmpdir("moonpost-log")
    run(function()
      local srv = launch(H.root .. "/examples/quickstart.lua", { MOONPOST_SPOOL = dir .. "/spool",
        MOONPOST_MAILDIR = dir .. "/mail" })
      assert.equal(0, srv.stop())
      for line in srv.log():gmatch("[^\n]+") do
        assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ [a-z]+ +%S", line)
      end
      assert.truthy(srv.log():find(" info  listening smtp 127.0.0.1:" .. srv.port, 1, true))
    end, 60)
    H.rm_rf(dir)
  end)
end)

-- The watchdog of a process without workers (moonpost.core.proc): a loop
-- that no longer runs (a hook in an endless loop) gets the process killed,
-- for its service manager to start again; what got a 250 is delivered
-- after the restart. A process stopped as a whole is not held to it.
describe("moonpost run without workers", function()
  local HANG_POLICY = [[
local moonpost = require "moonpost"
local env = moonpost.env
-- the watchdog: WATCHDOG, or what the file WATCHDOG_FILE holds when the
-- policy runs (a reload reads it again)
local wf = env.get("WATCHDOG_FILE") and io.open(env.get("WATCHDOG_FILE"))
local mta = moonpost.new { hostname = "mx.test", spool = env.spool,
  watchdog = wf and wf:read("*l") or env.get("WATCHDOG") }
if wf then wf:close() end
mta:use(require("moonpost.accept").smtp { listen = env.listen })
mta:use(require("moonpost.maildir").deliver {
  root = env.maildir,
  fsync = false,
  folder = function(rcpt)
    -- hang@: the first delivery hangs the loop (H.POLICY_HANG)
]] .. H.POLICY_HANG .. [[
    return env.maildir .. "/" .. rcpt["local"]
  end,
})
mta:run()
]]

  local function start_hang(dir, watchdog, file)
    H.write(dir .. "/policy.lua", HANG_POLICY)
    uv.fs_mkdir(dir .. "/mail", 448)
    local srv = launch(dir .. "/policy.lua", { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail",
      WATCHDOG = watchdog, WATCHDOG_FILE = file })
    assert.is_true(wait_log(srv, "listening smtp"), srv.log())
    return srv
  end

  it("is killed by its watchdog when its loop hangs, and delivers after a restart", function()
    local dir = H.tmpdir("moonpost-watchdog")
    run(function()
      local srv = start_hang(dir, "2s")
      assert.equal(250, (H.send(srv.port, { to = "hang@x.test" })))
      assert.is_true(H.wait_for(function() return uv.fs_stat(dir .. "/mail/hung") ~= nil end, 10), srv.log())
      assert.is_true(H.wait_for(function() return (srv.exited()) end, 10), "not killed: " .. srv.log())
      assert.matches("Z error watchdog: the event loop has not run for [%d.]+ s %(watchdog 2 s%)", srv.log())
      -- the message that got its 250 is delivered by the next process
      local again = start_hang(dir, "2s")
      assert.is_true(H.wait_for(function() return #H.ls(dir .. "/mail/hang/new") == 1 end, 15), again.log())
      assert.equal(0, again.stop())
    end, 60)
    H.rm_rf(dir)
  end)

  it("gets a watchdog from a reload when it started without one", function()
    local dir = H.tmpdir("moonpost-watchdog")
    run(function()
      H.write(dir .. "/wd", "0\n")
      local srv = start_hang(dir, nil, dir .. "/wd")
      H.write(dir .. "/wd", "2s\n")
      uv.kill(srv.pid, "sighup")
      assert.is_true(wait_log(srv, "new sessions use it"), srv.log())
      assert.equal(250, (H.send(srv.port, { to = "hang@x.test" })))
      assert.is_true(H.wait_for(function() return (srv.exited()) end, 15), "not killed: " .. srv.log())
      assert.matches("error watchdog: the event loop has not run for [%d.]+ s %(watchdog 2 s%)", srv.log())
    end, 60)
    H.rm_rf(dir)
  end)

  it("is left alone with watchdog = 0, and after it was stopped as a whole", function()
    local dir = H.tmpdir("moonpost-watchdog")
    run(function()
      -- stopped (SIGSTOP) for longer than its watchdog: that time is not the loop's
      local srv = start_hang(dir, "1s")
      uv.kill(srv.pid, "sigstop")
      sched.sleep(2.5)
      uv.kill(srv.pid, "sigcont")
      assert.equal(250, (H.send(srv.port, { to = "after-pause@x.test" })))
      assert.is_true(H.wait_for(function() return #H.ls(dir .. "/mail/after-pause/new") == 1 end, 10), srv.log())
      assert.is_false((srv.exited()))
      assert.equal(0, srv.stop())
      -- watchdog = 0: a hung loop stays hung (the test kills it)
      local off = start_hang(dir, "0")
      assert.equal(250, (H.send(off.port, { to = "hang@x.test" })))
      assert.is_true(H.wait_for(function() return uv.fs_stat(dir .. "/mail/hung") ~= nil end, 10), off.log())
      sched.sleep(3)
      assert.is_false((off.exited()))
      off.kill()
      assert.falsy(off.log():find("error watchdog:", 1, true), off.log())
    end, 60)
    H.rm_rf(dir)
  end)
end)
