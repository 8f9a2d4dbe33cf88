-- One slow destination does not hold every queue worker: at most
-- per_destination attempts run at once for one tenant@domain, and mail for
-- the other destinations goes out meanwhile (docs/spool.md, Attempts).
-- The slow destination is a real sink that answers each RCPT after 1.5 s.
local H = require "helpers"

local TIMEOUTS = { connect = 5, greeting = 5, ehlo = 5, mail = 5, rcpt = 5, data = 5, block = 5, done = 5 }

local function start(dir, fast_port, slow_port, queue)
  local q = { retry = { "1s" }, max_age = "1h", concurrency = 6 }
  for k, v in pairs(queue or {}) do q[k] = v end
  return H.start_mta({}, function(m)
    if fast_port then
      m:use(require("moonpost.route").smtp {
        relay = "127.0.0.1:" .. fast_port,
        routes = { ["slow.test"] = "127.0.0.1:" .. slow_port },
        max_connections = 2, idle_timeout = "1s", timeouts = TIMEOUTS,
      })
    end
  end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = q })
end

-- fn(fast, slow, mta, port): two real sinks, slow.test routed to the second,
-- and an MTA whose queue has these options (before() runs first); stopped after fn
local function with_sinks(dir, queue, fn, before)
  H.with_sink({}, function(fast)
    local slow = H.sink()
    local ok, err = pcall(function()
      if before then before() end
      local mta, port = start(dir, fast.port, slow.port, queue)
      fn(fast, slow, mta, port)
      H.stop_mta(mta)
    end)
    slow.stop()
    if not ok then error(err, 0) end
  end, 120)
end

local function first(list, rcpt)
  for i, a in ipairs(list) do
    for _, r in ipairs(a.rcpts) do if r == rcpt then return i, a end end
  end
end

describe("queue fairness", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-fair") end)
  after_each(function() H.rm_rf(dir) end)

  it("delivers to a quick destination while a slow one has a backlog", function()
    with_sinks(dir, { per_destination = 3 }, function(fast, slow, mta, port)
      for i = 1, 12 do
        assert.equal(250, H.send(port, { to = "slow1500-" .. i .. "@slow.test" }))
      end
      -- the slow destination's attempts have begun
      assert.is_true(H.wait_for(function() return #slow.events("connect") >= 1 end, 10))
      assert.equal(250, H.send(port, { to = "quick@fast.test" }))
      assert.is_true(H.wait_for(function() return #fast.messages() >= 1 end, 30))
      assert.is_true(H.wait_for(function() return #slow.messages() >= 12 end, 60))
      local quick = H.arrivals(fast)[1]
      local slows = H.arrivals(slow)
      assert.equal("quick@fast.test", quick.rcpt)
      -- before the first slow message was through: no worker waited on it
      assert.is_true(quick.t < slows[1].t, string.format("quick at %.3f, first slow at %.3f", quick.t, slows[1].t))
      -- every slow message got through, none twice
      local seen = {}
      for _, a in ipairs(slows) do
        assert.is_nil(seen[a.rcpt], a.rcpt)
        seen[a.rcpt] = true
      end
      H.wait_for(function() return mta.queue:depth() == 0 end, 10)
      assert.equal(0, mta.queue:depth())
    end)
  end)

  it("counts the messages set aside in the queue's depth and sends them as attempts end", function()
    with_sinks(dir, { per_destination = 1, concurrency = 4 }, function(_, slow, mta, port)
      for i = 1, 4 do
        assert.equal(250, H.send(port, { to = "slow1000-" .. i .. "@slow.test" }))
      end
      assert.is_true(H.wait_for(function() return #slow.events("connect") >= 1 end, 10))
      -- one attempt runs; the other three wait, set aside, and are counted
      local function slow_queue()
        for _, e in ipairs(mta:queues()) do
          if e.key == "@slow.test" then return e end
        end
      end
      assert.is_true(H.wait_for(function() return mta.queue.naside == 3 end, 10))
      assert.equal(4, mta.queue:depth())
      local e = slow_queue()
      assert.equal(4, e.depth)
      assert.equal(1, e.active)
      assert.equal(3, e.set_aside)
      assert.is_true(H.wait_for(function() return #slow.messages() >= 4 end, 30))
      -- one at a time: the sink saw no two transactions at once
      local a = H.arrivals(slow)
      for i = 2, #a do assert.is_true(a[i].t - a[i - 1].t >= 0.9, "attempts overlapped") end
      H.wait_for(function() return mta.queue:depth() == 0 end, 10)
      assert.equal(0, mta.queue.naside)
      e = slow_queue()
      assert.is_true(e == nil or (e.active == 0 and e.set_aside == 0))
    end)
  end)

  it("takes messages set aside at once when they are wanted now (an admin bounce)", function()
    with_sinks(dir, { per_destination = 1, concurrency = 4 }, function(_, slow, mta, port)
      for i = 1, 3 do
        assert.equal(250, H.send(port, { to = "slow1500-" .. i .. "@slow.test" }))
      end
      local q = mta.queue
      assert.is_true(H.wait_for(function() return q.naside == 2 end, 10))
      local list = {}
      for m in pairs(q.aside_of) do list[#list + 1] = m end
      assert.equal(2, #list)
      q:expedite(list)
      assert.equal(0, q.naside)
      -- attempted now, beside the one running: the route's second
      -- connection carries one of them while the first is still slow
      assert.is_true(H.wait_for(function() return #slow.messages() >= 3 end, 30))
      local a = H.arrivals(slow)
      assert.is_true(a[2].t - a[1].t < 1.0, "the expedited messages waited for the first one")
    end)
  end)

  -- docs/spool.md: "A message with recipients in several domains is
  -- attempted when any of its queues has room."
  it("attempts a message with several domains when its second queue has room", function()
    with_sinks(dir, { per_destination = 1, concurrency = 4 }, function(fast, slow, mta, port)
      local q = mta.queue
      assert.equal(250, H.send(port, { to = "slow3000-a1@slow.test" }))
      assert.is_true(H.wait_for(function() return (q.flight["@slow.test"] or 0) == 1 end, 10))
      assert.equal(250, H.send(port, { to = "slow3000-a2@slow.test" }))
      assert.is_true(H.wait_for(function() return q.naside == 1 end, 10))
      assert.equal(250, H.send(port, { to = "slow1000-b1@fast.test" }))
      assert.is_true(H.wait_for(function() return (q.flight["@fast.test"] or 0) == 1 end, 10))
      -- both of its queues are busy: set aside
      assert.equal(250, H.send(port, { to = { "slow3000-m@slow.test", "quick-m@fast.test" } }))
      assert.is_true(H.wait_for(function() return q.naside == 2 end, 10))
      -- b1's attempt ends: fast.test has room, and the message is attempted
      -- then, before a1's attempt ends and a2 gets its turn
      assert.is_true(H.wait_for(function() return #slow.messages() >= 3 and #fast.messages() >= 2 end, 60))
      local slows = H.arrivals(slow)
      local im = first(slows, "slow3000-m@slow.test")
      local i2 = first(slows, "slow3000-a2@slow.test")
      assert.is_true(im < i2, "the message with two domains waited for its first domain's backlog")
      H.wait_for(function() return q:depth() == 0 end, 10)
      assert.equal(0, q.naside)
    end)
  end)
  -- A restart with a backlog for a slow destination: the recovered messages
  -- ("?" until their first attempt reads them) count against it too.
  it("holds recovered messages for a slow destination to per_destination", function()
    local function queue_backlog()
      -- an MTA without a transport keeps them in the spool
      local mta, port = start(dir, nil, nil, { per_destination = 3 })
      for i = 1, 12 do
        assert.equal(250, H.send(port, { to = "slow1500-" .. i .. "@slow.test" }))
      end
      H.stop_mta(mta)
    end
    with_sinks(dir, { per_destination = 3 }, function(fast, slow, mta, port)
      assert.equal(12, mta.spool:count())
      assert.equal(250, H.send(port, { to = "quick@fast.test" }))
      assert.is_true(H.wait_for(function() return #fast.messages() >= 1 end, 30))
      assert.is_true(H.wait_for(function() return #slow.messages() >= 12 end, 60))
      local quick, slows = H.arrivals(fast)[1], H.arrivals(slow)
      assert.is_true(quick.t < slows[1].t, string.format("quick at %.3f, first slow at %.3f", quick.t, slows[1].t))
      H.wait_for(function() return mta.queue:depth() == 0 end, 10)
      assert.equal(0, mta.queue:depth())
      assert.equal(0, mta.queue.naside)
    end, queue_backlog)
  end)
end)
