-- Review of per_destination (runtime/queue.lua, "one destination does not
-- take every worker"): cases the first specs did not cover.
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

describe("queue fairness (review)", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-fair-rv") end)
  after_each(function() H.rm_rf(dir) end)

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
