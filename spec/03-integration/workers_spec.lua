-- Worker processes (issue 8, item 3), with real processes of
-- scripts/moonpost: moonpost.new { workers = 2 } makes `moonpost run` a
-- supervisor of two workers that share the SMTP port (SO_REUSEPORT), each
-- with its own spool partition; a worker killed with SIGKILL is started
-- again and recovers its partition; SIGTERM and SIGHUP reach every worker.
local H = require "helpers"
local uv = require "luv"
local cjson = require "cjson"
local http_client = require "moonpost.runtime.http_client"

local MOONPOST = H.root .. "/scripts/moonpost"

-- Like spec/fixtures/policies/crash.lua, with two workers: recipients
-- named defer-* go to <maildir>/.blocked/..., which cannot be made while
-- .blocked is a file, so they stay queued until the test removes it.
local POLICY = [[
local moonpost = require "moonpost"
local env = moonpost.env
-- a test holds worker GATE_WORKER here, before it has installed any signal
-- handler, until the file GATE_FILE exists (30 s at most)
local gate, uv = env.get("GATE_FILE"), require "luv"
if gate and os.getenv("MOONPOST_WORKER") == env.get("GATE_WORKER") and not uv.fs_stat(gate) then
  io.stderr:write("worker " .. os.getenv("MOONPOST_WORKER") .. " at the gate\n") -- one write: one line
  for _ = 1, 3000 do
    if uv.fs_stat(gate) then break end
    uv.sleep(10)
  end
end
local mta = moonpost.new {
  hostname = "mx.test", workers = 2, stop_grace = "5s", http = env.http, watchdog = env.get("WATCHDOG"),
  spool = { dir = env.spool, segment_size = "256k", min_free = 0 },
  queue = { concurrency = 50, retry = { "1s" } },
}
mta:use(require("moonpost.accept").smtp { listen = env.listen })
mta:use(require("moonpost.maildir").deliver {
  root = env.maildir,
  fsync = false,
  folder = function(rcpt)
    -- hang@: the worker that delivers it first hangs (H.POLICY_HANG)
]] .. H.POLICY_HANG .. [[
    -- fds@: what a program the policy starts finds on its fd 3
    if rcpt["local"] == "fds" then
      os.execute("sh -c 'readlink /proc/$$/fd/3; echo done' > " .. env.maildir .. "/fds.txt 2>&1")
    end
    if rcpt["local"]:match("^defer") then return env.maildir .. "/.blocked/" .. rcpt["local"] end
    return env.maildir .. "/" .. rcpt["local"]
  end,
})
-- an event log when a test asks for one: a file, a webhook whose queue
-- stays on disk (nothing listens at its URL)
local file, url = env.get("EVENTLOG_FILE"), env.get("EVENTLOG_URL")
if file or url then
  mta:use(require("moonpost.eventlog").setup { file = file, webhook = url and
    { url = url, dir = env.get("EVENTLOG_DIR"), retry_min = "1m", retry_max = "1m" } or nil })
end
mta:run()
]]

local run = H.run_killing -- the workers' supervisor is killed if a test fails half-way

-- start(dir [, http [, extra [, opts]]]) -> srv, env, port: the supervisor,
-- once both workers serve; extra: more environment variables; opts: more
-- options for H.launch
local function start(dir, http, extra, opts)
  local env = { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail", MOONPOST_HTTP = http }
  for k, v in pairs(extra or {}) do env[k] = v end
  uv.fs_mkdir(dir .. "/mail", 448)
  H.write(dir .. "/mail/.blocked", "a file, so that defer-* folders cannot be made\n")
  H.write(dir .. "/policy.lua", POLICY)
  local port = H.free_port()
  local lopts = { port = port }
  for k, v in pairs(opts or {}) do lopts[k] = v end
  local srv = H.launch(dir .. "/policy.lua", env, lopts)
  assert.is_true(H.wait_for(function() return H.count(srv.log(), " serving (spool ") >= 2 end, 15),
    "the workers did not start: " .. srv.log())
  return srv, env, port
end

-- { [index] = pid } of the workers serving now (the latest line of each)
local function worker_pids(srv)
  local pids = {}
  for i, pid in srv.log():gmatch("worker (%d+): pid (%d+) serving") do pids[tonumber(i)] = tonumber(pid) end
  return pids
end

local function alive(pid)
  return (uv.kill(pid, 0)) == 0
end

-- SIGTERM to the supervisor, and its exit (30 s at most)
local function stop_supervisor(srv)
  uv.kill(srv.pid, "sigterm")
  assert.is_true(H.wait_for(function() return (srv.exited()) end, 30), srv.log())
end

-- hang_one(srv, port, dir, pids) -> index, pid of the worker that hangs as
-- it delivers a message to hang@ (the one holding it: id % 2), once it has
local function hang_one(srv, port, dir, pids)
  local code, _, text = H.send(port, { to = "hang@x.test" })
  assert.equal(250, code)
  local w = tonumber(assert(text:match("queued as (%x+)")), 16) % 2
  assert.is_true(H.wait_for(function() return uv.fs_stat(dir .. "/mail/hung") ~= nil end, 15), srv.log())
  return w, pids[w]
end

-- Two consecutive free ports (the HTTP ports of workers 0 and 1), below
-- the ephemeral range so that no outgoing connection takes the second.
local function free_pair()
  for _ = 1, 100 do
    local p = math.random(20000, 30000)
    local a, b = uv.new_tcp(), uv.new_tcp()
    local ok = a:bind("127.0.0.1", p) and b:bind("127.0.0.1", p + 1)
    a:close()
    b:close()
    uv.run("nowait")
    if ok then return p end
  end
  error("no two free ports in a row")
end

-- GET http://127.0.0.1:port/path -> status, body
local function get(port, path)
  local c = assert(http_client.new("http://127.0.0.1:" .. port .. path, { timeout = 5 }))
  local res, err = c:request("GET")
  c:close()
  assert(res, err)
  return res.status, res.body
end

local function spool_list(dir)
  local code, out, err = H.exec(MOONPOST, { "spool", "list", dir, "--json" })
  assert(code == 0, err)
  return cjson.decode(out)
end

describe("workers = 2", function()
  it("spreads connections over both workers, each with its own pid, spool partition and HTTP port", function()
    local dir = H.tmpdir("moonpost-workers")
    run(function()
      local hport = free_pair()
      local srv, _, port = start(dir, "127.0.0.1:" .. hport)
      local pids = worker_pids(srv)
      assert.is_number(pids[0])
      assert.is_number(pids[1])
      assert.not_equal(pids[0], pids[1])
      assert.not_equal(srv.pid, pids[0])
      local n = 60
      for k = 1, n do
        local code = H.send(port, { to = "defer-" .. k .. "@x.test", body = "Subject: m" .. k .. "\r\n\r\nx\r\n" })
        assert.equal(250, code)
      end
      -- the session ids in the log carry the pid of the worker (hex)
      assert.is_true(H.wait_for(function() return H.count(srv.log(), " from=<sender@client.test>") >= n end, 10))
      local log = srv.log()
      local per = {}
      for i = 0, 1 do per[i] = H.count(log, string.format(" session=%x.", pids[i])) end
      assert.equal(n, per[0] + per[1])
      assert.is_true(per[0] > 0 and per[1] > 0, "not spread: " .. per[0] .. " and " .. per[1])
      -- the messages are queued in two partitions, and moonpost spool list sees both
      local l = spool_list(dir .. "/spool")
      assert.equal(n, l.queued)
      local parts, seen = { w0 = 0, w1 = 0 }, {}
      for _, m in ipairs(l.messages) do
        parts[m.partition] = parts[m.partition] + 1
        assert.is_nil(seen[m.id], "an id twice: " .. m.id)
        seen[m.id] = true
      end
      assert.same({ w0 = per[0], w1 = per[1] }, parts)
      assert.equal(per[0], spool_list(dir .. "/spool/w0").queued)
      -- worker i serves HTTP on the port + i: its own health and metrics
      for i = 0, 1 do
        assert.equal(200, (get(hport + i, "/readyz")))
        local _, metrics = get(hport + i, "/metrics")
        assert.matches(string.format('moonpost_messages_total{tenant="",listener="127.0.0.1:%d"} %d\n', port, per[i]),
          metrics, 1, true)
      end
      assert.equal(0, srv.stop())
    end, 60)
    H.rm_rf(dir)
  end)

  it("restarts a worker killed with SIGKILL under load; it recovers its partition and nothing acked is lost",
    function()
    local dir = H.tmpdir("moonpost-workers-kill")
    run(function()
      local srv, _, port = start(dir)
      local before = worker_pids(srv)
      local inj = H.inject({ port = port, sessions = 20, total = 600, rcpt = function(_, tok)
        return "defer-" .. tok .. "@x.test"
      end })
      assert.is_true(H.wait_for(function() return inj.nacked >= 200 end, 60), "no load: " .. srv.log())
      uv.kill(before[0], "sigkill")
      assert.is_true(H.wait_for(function()
        local p = worker_pids(srv)[0]
        return p and p ~= before[0]
      end, 15), "worker 0 was not restarted: " .. srv.log())
      local after = worker_pids(srv)
      assert.equal(before[1], after[1]) -- the other worker carried on
      assert.is_true(alive(after[0]))
      assert.matches(string.format("worker 0 %%(pid %d%%) exited: code 0, signal 9", before[0]), srv.log())
      -- the new worker 0 found the messages the killed one had queued
      local recovered
      for q in srv.log():gmatch("/spool/w0: %d+ segments, (%d+) messages queued") do recovered = tonumber(q) end
      assert.is_true(recovered and recovered > 0, "nothing recovered: " .. srv.log())
      assert.is_true(H.wait_for(function() return inj.running == 0 end, 60))
      -- now every acknowledged message can be delivered
      assert(os.remove(dir .. "/mail/.blocked"))
      local missing
      assert.is_true(H.wait_for(function()
        missing = 0
        for tok in pairs(inj.acked) do
          local files = H.ls(dir .. "/mail/.blocked/defer-" .. tok .. "/new")
          if #files == 0 then missing = missing + 1 end
        end
        return missing == 0
      end, 60), (missing or "?") .. " of " .. inj.nacked .. " acked messages not delivered")
      assert.is_true(H.wait_for(function() return spool_list(dir .. "/spool").queued == 0 end, 30))
      assert.equal(0, srv.stop())
    end, 180)
    H.rm_rf(dir)
  end)

  it("forwards SIGHUP (each worker reloads) and SIGTERM (all exit 0, then the supervisor exits 0)", function()
    local dir = H.tmpdir("moonpost-workers-term")
    run(function()
      local srv, _, port = start(dir)
      local pids = worker_pids(srv)
      uv.kill(srv.pid, "sighup")
      assert.is_true(H.wait_for(function() return H.count(srv.log(), "; new sessions use it") >= 2 end, 15),
        "not reloaded twice: " .. srv.log())
      assert.equal(250, (H.send(port, { to = "defer-1@x.test" })))
      assert.equal(0, srv.stop("sigterm"))
      local log = srv.log()
      for i = 0, 1 do
        assert.matches(string.format("worker %d %%(pid %d%%) exited: code 0", i, pids[i]), log)
        assert.is_false(alive(pids[i]))
      end
      assert.matches("supervisor: every worker has exited", log)
    end, 60)
    H.rm_rf(dir)
  end)

  it("holds a SIGHUP for a worker that is still starting until it reports ready, then passes it on", function()
    local dir = H.tmpdir("moonpost-workers-hup-start")
    run(function()
      local gate = dir .. "/gate"
      uv.fs_mkdir(dir .. "/mail", 448)
      H.write(dir .. "/policy.lua", POLICY)
      local srv = H.launch(dir .. "/policy.lua", { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail",
        GATE_FILE = gate, GATE_WORKER = "1" })
      assert.is_true(H.wait_for(function()
        local log = srv.log()
        return log:find("worker 0: pid %d+ serving") ~= nil and log:find("worker 1 at the gate", 1, true) ~= nil
      end, 15), srv.log())
      -- worker 1 has no handler yet: SIGHUP's default action would end it
      uv.kill(srv.pid, "sighup")
      assert.is_true(H.wait_for(function() return H.count(srv.log(), "; new sessions use it") == 1 end, 15),
        srv.log())
      assert.is_true(H.wait_for(function()
        return srv.log():find("supervisor: sighup: forwarded to 1 workers; 1 starting get it once ready", 1, true)
          ~= nil
      end, 10), srv.log())
      H.write(gate, "open\n")
      assert.is_true(H.wait_for(function() return H.count(srv.log(), "; new sessions use it") == 2 end, 15),
        srv.log())
      assert.is_true(H.wait_for(function()
        return srv.log():find("supervisor: worker 1 is ready: sighup passed on", 1, true) ~= nil
      end, 10), srv.log())
      local log = srv.log()
      -- worker 1 served, was sent the signal, then reloaded (its own log, in
      -- order); nothing exited
      local serving = log:find("worker 1: pid %d+ serving")
      local _, first = log:find("; new sessions use it", 1, true)
      local second = log:find("; new sessions use it", first + 1, true)
      assert.is_true(serving ~= nil and serving < second, log)
      assert.is_nil(log:find(") exited", 1, true), log)
      assert.equal(0, srv.stop())
    end, 60)
    H.rm_rf(dir)
  end)

  it("passes SIGUSR1 on: every worker reopens the event log's file, and the supervisor carries on; "
    .. "not while the workers stop", function()
    local dir = H.tmpdir("moonpost-workers-usr1")
    run(function()
      local path = dir .. "/events.jsonl"
      local srv, _, port = start(dir, nil, { EVENTLOG_FILE = path })
      -- the ids of the Reception records in a file
      local function receptions(file)
        local out = {}
        local f = io.open(file, "rb")
        if not f then return out end
        for line in f:lines() do
          local rec = cjson.decode(line)
          if rec.type == "Reception" then out[#out + 1] = rec.id end
        end
        f:close()
        table.sort(out)
        return out
      end
      local function send(k)
        local code, _, text = H.send(port, { to = "defer-" .. k .. "@x.test" })
        assert.equal(250, code)
        return text:match("queued as (%x+)")
      end
      local first = send(0)
      assert.is_true(H.wait_for(function() return #receptions(path) == 1 end, 10), srv.log())
      assert.is_true(os.rename(path, path .. ".1"))
      uv.kill(srv.pid, "sigusr1")
      assert.is_true(H.wait_for(function() return H.count(srv.log(), "eventlog: reopened " .. path) == 2 end, 10),
        srv.log())
      -- (the supervisor's own log is buffered: its line may come after the workers')
      assert.is_true(H.wait_for(function()
        return srv.log():find("supervisor: sigusr1: forwarded to 2 workers", 1, true) ~= nil
      end, 10), srv.log())
      assert.is_false((srv.exited()))
      -- both workers write to the new file now
      local after = {}
      for k = 1, 10 do after[k] = send(k) end
      table.sort(after)
      assert.is_true(H.wait_for(function() return #receptions(path) == 10 end, 10), srv.log())
      assert.same(after, receptions(path))
      assert.same({ first }, receptions(path .. ".1"))
      -- stopping: a transaction in progress holds a worker, whose handlers are
      -- closed; a SIGUSR1 now is not passed on (its default action would end it)
      local p = assert(H.connect(port))
      p:script("S: 220\nC: EHLO client.test\nS: 250\nC: MAIL FROM:<a@client.test>\nS: 250\n"
        .. "C: RCPT TO:<defer-last@x.test>\nS: 250\nC: DATA\nS: 354")
      uv.kill(srv.pid, "sigterm")
      assert.is_true(H.wait_for(function() return srv.log():find("supervisor: sigterm: stopping 2 workers", 1, true)
        ~= nil end, 10), srv.log())
      uv.kill(srv.pid, "sigusr1")
      assert.is_true(H.wait_for(function()
        return srv.log():find("supervisor: sigusr1: not forwarded: the workers are stopping", 1, true) ~= nil
      end, 10), srv.log())
      p:send("Subject: last\r\n\r\nx\r\n.\r\n")
      p:expect(250)
      p:close()
      assert.is_true(H.wait_for(function() return (srv.exited()) end, 15), srv.log())
      assert.equal(0, select(2, srv.exited()))
      assert.equal(2, H.count(srv.log(), ") exited: code 0\n"), srv.log())
    end, 60)
    H.rm_rf(dir)
  end)

  it("passes SIGUSR1 on without an event log file: no worker ends", function()
    local dir = H.tmpdir("moonpost-workers-usr1-nofile")
    run(function()
      local srv = start(dir)
      local pids = worker_pids(srv)
      uv.kill(srv.pid, "sigusr1")
      assert.is_true(H.wait_for(function() return H.count(srv.log(), "sigusr1: no event log file to reopen") == 2 end,
        10), srv.log())
      assert.is_true(alive(pids[0]) and alive(pids[1]))
      assert.is_nil(srv.log():find(") exited", 1, true), srv.log())
      assert.equal(0, srv.stop())
    end, 60)
    H.rm_rf(dir)
  end)

  it("keeps the workers out of the supervisor's process group: Ctrl-C (SIGINT to the group) stops each "
    .. "once, gracefully", function()
    local dir = H.tmpdir("moonpost-workers-pgrp")
    run(function()
      -- the supervisor leads a process group, as a shell's foreground job does
      local srv, _, port = start(dir, nil, nil, { detached = true })
      local pids = worker_pids(srv)
      -- /proc/<pid>/stat: pid (comm) state ppid pgrp session ...
      local function stat(pid)
        local ppid, pgrp, session = H.read("/proc/" .. pid .. "/stat"):match("%) %S+ (%d+) (%d+) (%d+)")
        return tonumber(ppid), tonumber(pgrp), tonumber(session)
      end
      local _, spgrp, ssession = stat(srv.pid)
      assert.equal(srv.pid, spgrp)
      for i = 0, 1 do
        local ppid, pgrp, session = stat(pids[i])
        assert.equal(srv.pid, ppid)
        assert.not_equal(spgrp, pgrp)
        assert.not_equal(ssession, session)
      end
      -- a transaction in progress: its worker must finish it, not be ended
      -- by a second SIGINT
      local p = assert(H.connect(port))
      p:script("S: 220\nC: EHLO client.test\nS: 250\nC: MAIL FROM:<a@client.test>\nS: 250\n"
        .. "C: RCPT TO:<defer-1@x.test>\nS: 250\nC: DATA\nS: 354")
      uv.kill(-srv.pid, "sigint")
      assert.is_true(H.wait_for(function() return srv.log():find("supervisor: sigint: stopping 2 workers", 1, true)
        ~= nil end, 10), srv.log())
      p:send("Subject: during the stop\r\n\r\nx\r\n.\r\n")
      p:expect(250)
      p:close()
      assert.is_true(H.wait_for(function() return (srv.exited()) end, 15), srv.log())
      assert.equal(0, select(2, srv.exited()))
      local log = srv.log()
      for i = 0, 1 do
        assert.matches(string.format("worker %d (pid %d) exited: code 0\n", i, pids[i]), log, 1, true)
      end
      assert.is_nil(log:find("sigint again", 1, true), log)
    end, 60)
    H.rm_rf(dir)
  end)

  it("ends the workers when the supervisor is killed with SIGKILL (PR_SET_PDEATHSIG)", function()
    local dir = H.tmpdir("moonpost-workers-pdeath")
    run(function()
      local srv = start(dir, nil, nil, { detached = true })
      local pids = worker_pids(srv)
      srv.kill()
      assert.is_true(H.wait_for(function() return not alive(pids[0]) and not alive(pids[1]) end, 15),
        "a worker outlived its supervisor")
    end, 60)
    H.rm_rf(dir)
  end)

  it("passes a second SIGTERM on: a worker waiting for a transaction to finish ends at once", function()
    local dir = H.tmpdir("moonpost-workers-term2")
    run(function()
      local srv, _, port = start(dir)
      -- a transaction in progress holds its worker for the grace period (5 s)
      local p = assert(H.connect(port))
      p:script("S: 220\nC: EHLO client.test\nS: 250\nC: MAIL FROM:<a@client.test>\nS: 250\n"
        .. "C: RCPT TO:<defer-1@x.test>\nS: 250\nC: DATA\nS: 354")
      uv.kill(srv.pid, "sigterm")
      -- the idle worker stops by itself; the busy one waits for the transaction
      assert.is_true(H.wait_for(function() return H.count(srv.log(), ") exited: code 0\n") == 1 end, 15), srv.log())
      uv.kill(srv.pid, "sigterm")
      assert.is_true(H.wait_for(function() return (srv.exited()) end, 15), srv.log())
      local _, code = srv.exited()
      assert.equal(0, code)
      -- the second SIGTERM ended the busy worker, not the end of its grace
      -- period: the supervisor passed the signal on, then the worker died of
      -- it (one whose grace runs out exits by itself: code 0, no signal, after
      -- logging "stopped", which only the idle worker did)
      local log = srv.log()
      local again = log:find("supervisor: sigterm again: passed to 1 workers", 1, true)
      local killed = log:find("%(pid %d+%) exited: code 0, signal 15\n")
      assert.is_true(again ~= nil and killed ~= nil and again < killed, log)
      assert.equal(1, H.count(log, " stopped\n"), log)
      -- and the transaction in progress got no reply
      assert.is_true(p:closed(5))
      p:close()
    end, 30)
    H.rm_rf(dir)
  end)

  it("gives each worker an event log webhook queue of its own, <dir>/w<i>, locked by that worker", function()
    local dir = H.tmpdir("moonpost-workers-outbox")
    run(function()
      local wh = dir .. "/webhook"
      local srv, _, port = start(dir, nil, { EVENTLOG_URL = "http://127.0.0.1:" .. H.free_port() .. "/e",
        EVENTLOG_DIR = wh })
      local pids = worker_pids(srv)
      local n, sent = 40, {}
      for k = 1, n do
        local code, _, text = H.send(port, { to = "defer-" .. k .. "@x.test" })
        assert.equal(250, code)
        sent[assert(text:match("queued as (%x+)"))] = true
      end
      -- a Reception record is in the queue before the 250 (docs/eventlog.md):
      -- every one is there once, whole, wherever it is
      local got, where = {}, {}
      for _, sub in ipairs({ "", "/w0", "/w1" }) do
        for _, name in ipairs(H.ls(wh .. sub)) do
          if name:match("%.jsonl$") then
            for line in H.read(wh .. sub .. "/" .. name):gmatch("[^\n]+") do
              local ok, rec = pcall(cjson.decode, line)
              assert(ok and type(rec) == "table", sub .. "/" .. name .. ": not a JSON object: " .. line)
              if rec.type == "Reception" then
                assert.is_nil(got[rec.id], "a record twice: " .. rec.id)
                got[rec.id], where[rec.id] = true, sub
              end
            end
          end
        end
      end
      assert.same(sent, got)
      -- in the queue of the worker that holds the message (id % 2), which
      -- holds the queue's lock
      for id, sub in pairs(where) do assert.equal("/w" .. tonumber(id, 16) % 2, sub, id) end
      for i = 0, 1 do assert.equal(pids[i] .. "\n", H.read(wh .. "/w" .. i .. "/LOCK")) end
      assert.equal(0, srv.stop())
    end, 60)
    H.rm_rf(dir)
  end)

  it("kills a worker that has not exited some time after its grace period (a hung worker), and exits", function()
    local dir = H.tmpdir("moonpost-workers-hung")
    local hung
    finally(function()
      -- were it left running (an orphan holding the port and its partition)
      if hung and alive(hung) then uv.kill(hung, "sigkill") end
    end)
    run(function()
      local srv, _, port = start(dir)
      local pids = worker_pids(srv)
      local w
      w, hung = hang_one(srv, port, dir, pids)
      uv.kill(srv.pid, "sigterm")
      -- the other worker stops; the hung one never handles its SIGTERM
      assert.is_true(H.wait_for(function() return (srv.exited()) end, 30), "the supervisor did not exit: " .. srv.log())
      assert.equal(0, select(2, srv.exited()))
      local log = srv.log()
      assert.matches(string.format("supervisor: worker %d (pid %d) has not exited 2 s after its grace period (5 s): "
        .. "killed", w, hung), log, 1, true)
      assert.matches(string.format("worker %d (pid %d) exited: code 0, signal 9", w, hung), log, 1, true)
      assert.is_false(alive(hung))
      assert.is_false(alive(pids[1 - w]))
    end, 60)
    H.rm_rf(dir)
  end)

  it("kills a worker whose loop no longer runs (watchdog), starts it again, and it delivers what it held", function()
    local dir = H.tmpdir("moonpost-workers-watchdog")
    local hung
    finally(function()
      if hung and alive(hung) then uv.kill(hung, "sigkill") end
    end)
    run(function()
      local srv, _, port = start(dir, nil, { WATCHDOG = "2s" })
      local pids = worker_pids(srv)
      local w
      w, hung = hang_one(srv, port, dir, pids)
      -- a worker that only waits (no mail) keeps its heartbeat
      assert.is_true(H.wait_for(function() return not alive(hung) end, 15), "the hung worker was not killed: " .. srv.log())
      -- (the supervisor's lines come through a pipe: they may follow the kill)
      local said = string.format("supervisor: worker %d %%(pid %d%%) has not answered for [%%d.]+ s %%(watchdog 2 s%%)", w,
        hung)
      local exited = string.format("worker %d (pid %d) exited: code 0, signal 9", w, hung)
      assert.is_true(H.wait_for(function()
        return srv.log():find(said) ~= nil and srv.log():find(exited, 1, true) ~= nil
      end, 10), srv.log())
      local log = srv.log()
      assert.not_matches(string.format("worker %d %%(pid %d%%) has not answered", 1 - w, pids[1 - w]), log)
      assert.is_true(alive(pids[1 - w]))
      -- started again, it recovers its partition and delivers the message
      assert.is_true(H.wait_for(function()
        local now = worker_pids(srv)
        return now[w] and now[w] ~= hung
      end, 15), srv.log())
      assert.is_true(H.wait_for(function() return #H.ls(dir .. "/mail/hang/new") == 1 end, 15), srv.log())
      stop_supervisor(srv)
      assert.equal(0, select(2, srv.exited()))
    end, 90)
    H.rm_rf(dir)
  end)

  it("kills no worker when the supervisor and its workers were all paused (a frozen container) longer than the "
    .. "watchdog", function()
    local dir = H.tmpdir("moonpost-workers-watchdog-paused")
    local all = {}
    finally(function()
      for _, pid in ipairs(all) do uv.kill(pid, "sigcont") end
    end)
    run(function()
      local srv, _, port = start(dir, nil, { WATCHDOG = "2s" })
      local pids = worker_pids(srv)
      all = { srv.pid, pids[0], pids[1] }
      -- a cgroup freeze (docker pause, systemctl freeze) stops every process
      -- at once; the thaw wakes them in no particular order
      for _, pid in ipairs(all) do uv.kill(pid, "sigstop") end
      H.wait_for(function() return false end, 4)
      uv.kill(srv.pid, "sigcont")
      H.wait_for(function() return false end, 0.3)
      uv.kill(pids[0], "sigcont")
      uv.kill(pids[1], "sigcont")
      -- the workers' loops run again: their heartbeats come, and nobody is killed
      H.wait_for(function() return false end, 3)
      assert.not_matches("has not answered", srv.log())
      assert.is_true(alive(pids[0]) and alive(pids[1]), srv.log())
      assert.same(pids, worker_pids(srv))
      assert.equal(250, (H.send(port, { to = "after@x.test" })))
      -- a worker that hangs afterwards is still found
      uv.kill(pids[1], "sigstop")
      assert.is_true(H.wait_for(function() return not alive(pids[1]) end, 15), "not killed: " .. srv.log())
      stop_supervisor(srv)
    end, 90)
    H.rm_rf(dir)
  end)

  it("keeps the heartbeat pipe from the programs a worker's policy starts", function()
    local dir = H.tmpdir("moonpost-workers-fds")
    run(function()
      local srv, _, port = start(dir)
      assert.equal(250, (H.send(port, { to = "fds@x.test" })))
      local out
      assert.is_true(H.wait_for(function()
        local f = io.open(dir .. "/mail/fds.txt", "rb")
        out = f and f:read("*a")
        if f then f:close() end
        return out and out:find("done", 1, true) ~= nil
      end, 15), srv.log())
      -- nothing on fd 3 (the supervisor's end is a socket: "socket:[...]")
      assert.equal("done\n", out)
      stop_supervisor(srv)
    end, 60)
    H.rm_rf(dir)
  end)

  it("names the signal of a worker that died before it started in the supervisor's error", function()
    local dir = H.tmpdir("moonpost-workers-killed-starting")
    run(function()
      uv.fs_mkdir(dir .. "/mail", 448)
      H.write(dir .. "/policy.lua", POLICY)
      local srv = H.launch(dir .. "/policy.lua", { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail",
        GATE_FILE = dir .. "/gate", GATE_WORKER = "1" })
      local pid
      assert.is_true(H.wait_for(function()
        local log = srv.log()
        pid = log:match("worker 1 started: pid (%d+)")
        return pid and log:find("worker 1 at the gate", 1, true) ~= nil
      end, 15), srv.log())
      -- killed while it starts (the OOM killer, an operator)
      uv.kill(tonumber(pid), "sigkill")
      assert.is_true(H.wait_for(function() return (srv.exited()) end, 15), "still running: " .. srv.log())
      assert.equal(1, select(2, srv.exited()))
      -- not "code 0", which reads as a worker that ended by itself
      assert.matches("worker 1 exited before it started (code 0, signal 9)", srv.log(), 1, true)
    end, 60)
    H.rm_rf(dir)
  end)

  it("fails with status 1 when another supervisor's workers hold the port (SO_REUSEPORT would share it)",
    function()
    local dir = H.tmpdir("moonpost-workers-two")
    run(function()
      local first, _, port = start(dir)
      local pids = worker_pids(first)
      -- a second instance on the same port, with a spool of its own: its
      -- workers' SO_REUSEPORT binds would succeed, and the kernel would
      -- spread the first one's connections over both
      uv.fs_mkdir(dir .. "/mail2", 448)
      local second = H.launch(dir .. "/policy.lua", { MOONPOST_SPOOL = dir .. "/spool2",
        MOONPOST_MAILDIR = dir .. "/mail2" }, { port = port })
      assert.is_true(H.wait_for(function() return (second.exited()) end, 15), "still running: " .. second.log())
      assert.equal(1, select(2, second.exited()))
      assert.matches("cannot listen on 127.0.0.1:" .. port .. ": EADDRINUSE", second.log(), 1, true)
      assert.is_nil(second.log():find(" serving (spool ", 1, true), second.log())
      -- every connection still reaches the first instance
      for k = 1, 20 do
        local code, _, text = H.send(port, { to = "defer-" .. k .. "@x.test" })
        assert.equal(250, code)
        assert.is_truthy(text:match("queued as %x+"))
      end
      assert.equal(20, spool_list(dir .. "/spool").queued)
      assert.same(pids, worker_pids(first))
      -- on the same spool (and another port) the workers find it locked
      local third = H.launch(dir .. "/policy.lua", { MOONPOST_SPOOL = dir .. "/spool",
        MOONPOST_MAILDIR = dir .. "/mail2" })
      assert.is_true(H.wait_for(function() return (third.exited()) end, 15), "still running: " .. third.log())
      assert.equal(1, select(2, third.exited()))
      assert.matches("/spool/w%d is locked by another process %(pid " .. "%d+", third.log())
      assert.matches("exited before it started (code 1)", third.log(), 1, true)
      assert.same(pids, worker_pids(first))
      assert.equal(0, first.stop())
    end, 60)
    H.rm_rf(dir)
  end)

  it("fails with status 1 when the port is taken, before it starts a worker", function()
    local dir = H.tmpdir("moonpost-workers-fail")
    run(function()
      local busy = uv.new_tcp()
      busy:bind("127.0.0.1", 0)
      busy:listen(8, function() end)
      local port = busy:getsockname().port
      H.write(dir .. "/policy.lua", POLICY)
      local srv = H.launch(dir .. "/policy.lua", { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail" },
        { port = port })
          assert.is_true(H.wait_for(function() return (srv.exited()) end, 15), "still running: " .. srv.log())
      local _, code = srv.exited()
      assert.equal(1, code)
      assert.matches("cannot listen on 127.0.0.1:" .. port, srv.log())
      -- the supervisor finds it before it starts any worker
      assert.is_nil(srv.log():find("supervisor: worker 0 started", 1, true), srv.log())
      busy:close()
    end, 30)
    H.rm_rf(dir)
  end)
end)
