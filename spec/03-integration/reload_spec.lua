-- mta:reload_policy(): the policy file runs again and its MTA takes over
-- from the running one. In this process, so that the hand-over of each
-- piece (sockets, queue, tenants, blocks with state) can be looked at;
-- process_spec.lua does it to a real process with SIGHUP.
local H = require "helpers"
local uv = require "luv"
local policy = require "moonpost.runtime.policy"

local moonpost = require "moonpost"

-- Load a policy file (it builds an MTA and does not call run()) and start
-- the MTA it built.
local function start(path)
  local before = #moonpost.instances
  assert(policy.load(path))
  local mta = moonpost.instances[before + 1]
  assert(mta:start())
  return mta
end

local HEAD = [[
local moonpost = require "moonpost"
local mta = moonpost.new { hostname = "mx.test", spool = %q, queue = { concurrency = %d, retry = { %q } }%s }
]]

local function write(path, spool, o)
  H.write(path, string.format(HEAD, spool, o.concurrency or 4, o.retry or "1m", o.new or "") .. (o.body or ""))
end

local function session(port)
  local p = assert(H.connect(port))
  p:script("S: 220\nC: EHLO client.test\nS: 250")
  return p
end

describe("mta:reload_policy()", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-reload") end)
  after_each(function() H.rm_rf(dir) end)

  it("keeps the socket of an unchanged address, the spool and the queue, and takes the new queue options", function()
    H.run(function()
      local path = dir .. "/policy.lua"
      local body = [[
mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false })
mta:set_transport(function(_, _, rcpts)
  local out = {}
  for _, r in ipairs(rcpts) do out[r.index] = { status = "deferred", text = "4.0.0 later" } end
  return out
end)
]]
      write(path, dir .. "/spool", { concurrency = 4, body = body })
      local old = start(path)
      local port = old:addresses()[1].port
      local sp, q = old.spool, old.queue
      assert.equal(4, q.concurrency)
      write(path, dir .. "/spool", { concurrency = 7, retry = "2m", body = body })
      assert.is_true(old:reload_policy(path))
      local new = moonpost.current()
      assert.are_not.equal(old, new)
      -- listen = 127.0.0.1:0 again: the same socket, so the same port
      assert.equal(port, new:addresses()[1].port)
      assert.equal(sp, new.spool)
      assert.equal(q, new.queue)
      assert.equal(new, q.mta)
      assert.equal(7, q.concurrency)
      assert.same({ 120 }, q.retry)
      local workers = 0
      for _ in pairs(q.workers) do workers = workers + 1 end
      assert.equal(7, workers)
      assert.equal(250, (H.send(port)))
      assert.is_true(old.retired)
      assert.equal(0, #old.listeners)
      -- fewer workers after another reload
      write(path, dir .. "/spool", { concurrency = 2, body = body })
      assert.is_true(moonpost.reload_policy(path))
      local newer = moonpost.current()
      assert.is_true(H.wait_for(function()
        local n = 0
        for _ in pairs(q.workers) do n = n + 1 end
        return n == 2
      end, 5))
      assert.equal(port, newer:addresses()[1].port)
      H.stop_mta(newer)
      assert.is_nil(moonpost.current())
    end)
  end)

  it("leaves the running MTA untouched when the new policy cannot open an address, closing what it opened",
    function()
    H.run(function()
      local path = dir .. "/policy.lua"
      local free = H.free_port()
      local taken = uv.new_tcp()
      taken:bind("127.0.0.1", 0)
      taken:listen(1, function() end)
      local tport = taken:getsockname().port
      write(path, dir .. "/spool", { body = [[
mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false })
]] })
      local old = start(path)
      local port = old:addresses()[1].port
      write(path, dir .. "/spool", { body = string.format([[
mta:use(require("moonpost.accept").smtp { listen = { "127.0.0.1:%d", "127.0.0.1:%d" } })
mta:on("smtp_server_rcpt_to", function() return moonpost.reject() end)
]], free, tport) })
      local ninstances = #moonpost.instances
      local ok, err = old:reload_policy(path)
      assert.is_nil(ok)
      assert.equal("cannot listen on 127.0.0.1:" .. tport .. ": EADDRINUSE: address already in use", err)
      -- the MTA the failed reload built is not an instance
      assert.equal(ninstances, #moonpost.instances)
      taken:close()
      assert.equal(old, moonpost.current())
      assert.is_false(old.retired or false)
      assert.equal(port, old:addresses()[1].port)
      assert.equal(250, (H.send(port)))
      -- the address it had opened is closed again
      assert.is_nil(H.connect(free, "127.0.0.1", 1))
      H.stop_mta(old)
    end)
  end)

  it("refuses a change of spool directory", function()
    H.run(function()
      local path = dir .. "/policy.lua"
      local body = 'mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0" })\n'
      write(path, dir .. "/spool", { body = body })
      local old = start(path)
      write(path, dir .. "/spool2", { body = body })
      local ok, err = old:reload_policy(path)
      assert.is_nil(ok)
      assert.equal("spool: the directory changed from " .. dir .. "/spool to " .. dir
        .. "/spool2; that needs a restart", err)
      assert.is_nil(uv.fs_stat(dir .. "/spool2"))
      H.stop_mta(old)
    end)
  end)

  it("shares the suppression store between the old block and the new one; the last stop closes it", function()
    H.run(function()
      local path = dir .. "/policy.lua"
      local function body(text)
        return string.format([[
local suppress = require("moonpost.suppress").setup { path = %q, reply = { 550, "5.7.1", %q } }
mta:use(suppress)
mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false })
]], dir .. "/suppress", text)
      end
      write(path, dir .. "/spool", { body = body("old text") })
      local old = start(path)
      local port = old:addresses()[1].port
      local s1 = old.blocks[1]
      assert.is_true(s1:add(nil, "one@x.test", "test"))
      -- a session of the old policy, open across the reload
      local held = session(port)
      write(path, dir .. "/spool", { body = body("new text") })
      assert.is_true(old:reload_policy(path))
      local new = moonpost.current()
      local s2 = new.blocks[1]
      assert.are_not.equal(s1, s2)
      assert.is_true(s2:is_open())
      -- one store: what one handle adds, the other sees
      assert.equal("test", s2:check(nil, "one@x.test").reason)
      assert.is_true(s2:add(nil, "two@x.test", "test"))
      assert.equal("test", s1:check(nil, "two@x.test").reason)
      assert.is_true(s2:flush())
      -- each policy answers with its own options
      held:script("C: MAIL FROM:<a@c.test>\nS: 250\nC: RCPT TO:<two@x.test>\nS: 550 5.7.1 old text")
      local fresh = session(port)
      fresh:script("C: MAIL FROM:<a@c.test>\nS: 250\nC: RCPT TO:<one@x.test>\nS: 550 5.7.1 new text")
      fresh:close()
      -- the old policy retires when its session ends; the store stays open
      held:script("C: QUIT\nS: 221")
      held:close()
      assert.is_true(H.wait_for(function() return old.retire_done end, 5))
      assert.is_true(s2:is_open())
      assert.equal("test", s2:check(nil, "one@x.test").reason)
      H.stop_mta(new)
      assert.is_true(H.wait_for(function() return s1.state == "closed" end, 5))
      assert.equal(1, select(2, H.log():gsub("suppress: [^\n]*: closed with 2 entries", "")))
      -- both entries are in the file
      local check = require("moonpost.suppress").setup { path = dir .. "/suppress" }
      assert.is_true(check:open())
      assert.truthy(check:check(nil, "one@x.test"))
      assert.truthy(check:check(nil, "two@x.test"))
      check:close()
    end)
  end)

  it("counts the connections of a tenant across the reload", function()
    H.run(function()
      local path = dir .. "/policy.lua"
      local body = [[
mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", tenant = "acme", log_messages = false })
]]
      write(path, dir .. "/spool", { new = ", tenants = { acme = { max_connections = 1 } }", body = body })
      local old = start(path)
      local port = old:addresses()[1].port
      local first = session(port)
      assert.is_true(old:reload_policy(path))
      -- the session from before the reload still counts
      local p = assert(H.connect(port))
      p:expect(421, "4.7.0", "too many connections for this tenant")
      p:close()
      first:script("C: QUIT\nS: 221")
      first:close()
      assert.is_true(H.wait_for(function() return moonpost.current().tenants:connections("acme") == 0 end, 5))
      local again = session(port)
      again:close()
      H.stop_mta(moonpost.current())
    end)
  end)

  it("carries the counters and histograms over, and counts the old policy's sessions in the new registry",
    function()
    H.run(function()
      local path = dir .. "/policy.lua"
      local body = [[
mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false })
mta:set_transport(function(_, _, rcpts)
  local out = {}
  for _, r in ipairs(rcpts) do out[r.index] = { status = "deferred", text = "4.0.0 later" } end
  return out
end)
local mine = mta.metrics:counter("policy_checks_total", "checks", { "kind" })
mta:on("smtp_server_mail_from", function() mine:inc("from") end)
]]
      write(path, dir .. "/spool", { body = body })
      local old = start(path)
      local port = old:addresses()[1].port
      assert.equal(250, (H.send(port)))
      local function value(mta, series)
        local text = "\n" .. mta.metrics:render()
        local _, e = text:find("\n" .. series .. " ", 1, true)
        return e and tonumber(text:match("^%S+", e + 1))
      end
      local received = 'moonpost_messages_total{tenant="",listener="127.0.0.1:' .. port .. '"}'
      assert.equal(1, value(old, received))
      assert.equal(1, value(old, 'moonpost_policy_checks_total{kind="from"}'))
      -- a session of the old policy, open across the reload
      local p = session(port)
      assert.is_true(old:reload_policy(path))
      local new = moonpost.current()
      assert.are_not.equal(old.metrics, new.metrics)
      assert.equal(1, value(new, received))
      assert.equal(1, value(new, 'moonpost_policy_checks_total{kind="from"}'))
      assert.equal(2, value(new, "moonpost_connections_total{direction=\"in\"}"))
      -- the old session's message counts in the registry /metrics now serves
      p:script("C: MAIL FROM:<a@x.test>\nS: 250\nC: RCPT TO:<b@y.test>\nS: 250\nC: DATA\nS: 354\n"
        .. "C: Subject: x\nC: \nC: hi\nC: .\nS: 250\nC: QUIT\nS: 221")
      p:close()
      assert.equal(2, value(new, received))
      assert.equal(2, value(new, 'moonpost_connections_total{direction="in"}'))
      -- the old policy's own counter is the new one's
      assert.equal(2, value(new, 'moonpost_policy_checks_total{kind="from"}'))
      H.stop_mta(new)
    end)
  end)

  it("counts the old policy's parked sessions as parked", function()
    H.run(function()
      local path = dir .. "/policy.lua"
      write(path, dir .. "/spool", { body = [[
mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false,
  idle_park_after = 0 })
]] })
      local old = start(path)
      local port = old:addresses()[1].port
      local held = { session(port), session(port) }
      assert.is_true(H.wait_for(function() return old:parked_sessions() == 2 end, 5))
      assert.is_true(old:reload_policy(path))
      local new = moonpost.current()
      assert.equal(2, new:sessions())
      assert.equal(2, new:parked_sessions())
      -- one carries on (unparked while it waits for RCPT), one leaves
      held[1]:script("C: MAIL FROM:<a@x.test>\nS: 250")
      held[2]:script("C: QUIT\nS: 221")
      held[2]:close()
      assert.is_true(H.wait_for(function() return new:parked_sessions() == 0 and new:sessions() == 1 end, 5))
      held[1]:close()
      H.stop_mta(new)
    end)
  end)

  it("drains the sessions of the old policy when the new MTA stops", function()
    H.run(function()
      local path = dir .. "/policy.lua"
      write(path, dir .. "/spool", { body = [[
mta:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0", log_messages = false })
]] })
      local old = start(path)
      local port = old:addresses()[1].port
      local held = session(port)
      assert.is_true(old:reload_policy(path))
      local new = moonpost.current()
      assert.equal(1, new:sessions())
      local done = false
      new:stop(5, function() done = true end)
      held:expect(421, "4.3.2", "Service shutting down")
      held:close()
      assert.is_true(H.wait_for(function() return done end, 2))
      assert.is_true(old.retire_done)
    end)
  end)
end)

describe("blocks across a reload", function()
  it("shape: suspensions and rates carry over; deliveries held by the old shaper are handed back", function()
    local shape = require "moonpost.shape"
    local opts = { default = { rate = "1/h" }, rules = { { match = "421", action = "suspend", duration = "1h" } } }
    local b1 = shape.setup(opts)
    local s1 = b1.shaper
    local g1 = s1:gates_for({ ready = "a>site" })
    assert.truthy(s1:admit(g1))
    s1:observe(g1, nil, { status = "deferred", code = 421, text = "slow down" })
    -- a delivery waits at the gate
    local handed = 0
    s1:park(g1[1], function() handed = handed + 1 end, nil)
    local b2 = shape.setup(opts)
    assert.is_true(b2.handover(b2, b1))
    local g2 = b2.shaper:gates_for({ ready = "a>site" })
    assert.are_not.equal(g1[1], g2[1])
    assert.is_true(g2[1].suspended_until > uv.now() / 1000 + 3000)
    -- the bucket's token was spent under the old shaper
    assert.is_true(g2[1].buckets[1].tokens < 1)
    -- the old shaper stops when the old transport closes: its parked deliveries go back
    s1:stop()
    assert.equal(1, handed)
    -- a park on the stopped shaper hands back at once
    s1:park(g1[1], function() handed = handed + 1 end, nil)
    assert.equal(2, handed)
  end)

  it("route.smtp: the day's warm-up counts carry on", function()
    local route = require "moonpost.route"
    local opts = { warmup = { schedule = { default = { 10 } } },
      pools = { p = { { source = "192.0.2.1", warmup = "2026-01-01" } } } }
    local b1 = route.smtp(opts)
    local day = math.floor(os.time() / 86400)
    b1.warm_sent["192.0.2.1"] = { site = { day = day, n = 7 } }
    local b2 = route.smtp(opts)
    assert.equal(0, b2.sent_today("192.0.2.1", "site"))
    assert.is_true(b2.handover(b2, b1))
    assert.equal(7, b2.sent_today("192.0.2.1", "site"))
    assert.equal(b1.warm_sent, b2.warm_sent)
  end)
end)
