-- Egress pools: the source address and HELO each message leaves from, seen
-- by the peer (the sink logs the peer address of each connection and the
-- name in its EHLO), warm-up caps with spill-over, and the pool header.
local H = require "helpers"

local TIMEOUTS = { connect = 2, greeting = 2, ehlo = 2, mail = 2, rcpt = 2, data = 2, block = 2, done = 2 }

local with_sink = H.with_sink

-- messages at the sink with the peer address and EHLO name of their connection
local arrivals = H.arrivals

local function start(dir, port, route_opts, setup)
  local ro = { relay = "127.0.0.1:" .. port, idle_timeout = "1s", timeouts = TIMEOUTS }
  for k, v in pairs(route_opts) do ro[k] = v end
  return H.start_mta({}, function(m)
    if setup then setup(m) end
    m:use(require("moonpost.route").smtp(ro))
  end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" }, max_age = "1h" } })
end

describe("route.smtp egress pools", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-pools") end)
  after_each(function() H.rm_rf(dir) end)

  it("sends each tenant's mail from its own pool's addresses and HELO names", function()
    with_sink({}, function(sink)
      local mta, port = start(dir, sink.port, {
        pools = {
          a = { { source = "127.0.0.2", helo = "out-a.esp.test" }, tenants = { "a" } },
          b = { { source = "127.0.0.3", helo = "out-b1.esp.test", weight = 1 },
                { source = "127.0.0.4", helo = "out-b2.esp.test", weight = 1 } },
        },
        tenant_pools = { a = "a", b = "b" },
      }, function(m)
        -- the spec's tenants: by the sender's local part
        m:on("smtp_server_mail_from", function(txn, from) txn.tenant = from.address:match("^(%a+)%-") end)
      end)
      for i = 1, 10 do
        assert.equal(250, H.send(port, { from = "a-" .. i .. "@client.test", to = "x" .. i .. "@dest.test" }))
        assert.equal(250, H.send(port, { from = "b-" .. i .. "@client.test", to = "y" .. i .. "@dest.test" }))
      end
      H.wait_for(function() return #sink.messages() >= 20 end, 20)
      local seen = {}
      for _, a in ipairs(arrivals(sink)) do
        local who = a.rcpts[1]:sub(1, 1)
        if who == "x" then
          assert.equal("127.0.0.2", a.peer)
          assert.equal("out-a.esp.test", a.helo)
        else
          assert.is_true(a.peer == "127.0.0.3" or a.peer == "127.0.0.4", a.peer)
          assert.equal(a.peer == "127.0.0.3" and "out-b1.esp.test" or "out-b2.esp.test", a.helo)
        end
        seen[a.peer] = (seen[a.peer] or 0) + 1
      end
      assert.equal(10, seen["127.0.0.2"])
      assert.equal(10, (seen["127.0.0.3"] or 0) + (seen["127.0.0.4"] or 0))
      H.stop_mta(mta)
    end, 60)
  end)

  it("caps a warming source per site and day, and spills the rest to warmed sources", function()
    with_sink({}, function(sink)
      local today = os.date("!%Y-%m-%d")
      local opts = {
        pools = { main = { { source = "127.0.0.2", helo = "new.esp.test", weight = 100, warmup = today },
                           { source = "127.0.0.3", helo = "old.esp.test", weight = 1 } } },
        default_pool = "main",
        warmup = { schedule = { default = { 5, 50, 500 } }, state = dir .. "/warmup.json" },
      }
      local mta, port = start(dir, sink.port, opts)
      -- many at once: concurrent deliveries must not all take the new address
      local st = H.inject({ port = port, sessions = 5, total = 20, body = "warm\r\n",
        rcpt = function(seq) return "u" .. seq .. "@dest.test" end })
      H.wait_for(function() return st.running == 0 end, 20)
      local n = st.nacked -- sessions in flight may get a few more in
      H.wait_for(function() return #sink.messages() >= n end, 20)
      local seen = {}
      for _, a in ipairs(arrivals(sink)) do seen[a.peer] = (seen[a.peer] or 0) + 1 end
      -- day 0 of the schedule: 5 from the new address (weight 100 makes it
      -- the first choice while it may), the others spill over
      assert.equal(5, seen["127.0.0.2"])
      assert.equal(n - 5, seen["127.0.0.3"])
      H.stop_mta(mta)
      -- the day's counts outlive a restart: the new address stays capped
      assert.matches('"127.0.0.2":{"%[127.0.0.1%]:%d+":5}', H.read(dir .. "/warmup.json"))
      mta, port = start(dir, sink.port, opts)
      for i = 101, 105 do assert.equal(250, H.send(port, { to = "u" .. i .. "@dest.test" })) end
      H.wait_for(function() return #sink.messages() >= n + 5 end, 20)
      seen = {}
      for _, a in ipairs(arrivals(sink)) do seen[a.peer] = (seen[a.peer] or 0) + 1 end
      assert.equal(5, seen["127.0.0.2"])
      assert.equal(n, seen["127.0.0.3"])
      H.stop_mta(mta)
    end, 60)
  end)

  it("lets a header pick a pool or source the tenant may use, and refuses the others", function()
    with_sink({}, function(sink)
      local mta, port = start(dir, sink.port, {
        pools = {
          shared = { { name = "vmta1", source = "127.0.0.2", helo = "vmta1.esp.test" },
                     { name = "vmta2", source = "127.0.0.3", helo = "vmta2.esp.test" } },
          private = { { name = "vmta9", source = "127.0.0.4", helo = "vmta9.esp.test" }, tenants = { "vip" } },
        },
        default_pool = "shared",
        pool_header = "X-Virtual-MTA",
      })
      local function msg(v) return "X-Virtual-MTA: " .. v .. "\r\nSubject: pick\r\n\r\nbody\r\n" end
      assert.equal(250, H.send(port, { to = "one@dest.test", body = msg("vmta2") }))
      local code, enh, text = H.send(port, { to = "two@dest.test", body = msg("private") })
      assert.equal(550, code)
      assert.equal("5.7.1", enh)
      assert.matches("not a pool this sender may use", text)
      code = H.send(port, { to = "three@dest.test", body = msg("vmta9") })
      assert.equal(550, code)
      code = H.send(port, { to = "four@dest.test", body = msg("nosuch") })
      assert.equal(550, code)
      code = H.send(port, { to = "five@dest.test", body = "X-Virtual-MTA: vmta1\r\n" .. msg("vmta2") })
      assert.equal(550, code)
      H.wait_for(function() return #sink.messages() >= 1 end, 10)
      local a = arrivals(sink)
      assert.equal(1, #a)
      assert.equal("127.0.0.3", a[1].peer)
      assert.equal("vmta2.esp.test", a[1].helo)
      -- the header chose the source; it does not leave with the message
      assert.is_nil(a[1].data:find("X-Virtual-MTA", 1, true))
      assert.matches("Subject: pick", a[1].data)
      H.stop_mta(mta)
    end, 60)
  end)

  it("reports pool mistakes with the field", function()
    local route = require "moonpost.route"
    local function err_of(opts)
      local ok, err = pcall(route.smtp, opts)
      assert.is_false(ok)
      return tostring(err)
    end
    assert.matches("no pool named 'nope'", err_of({ pools = { a = { "127.0.0.2" } }, tenant_pools = { t = "nope" } }))
    assert.matches("not an IP address", err_of({ pools = { a = { { source = "mail.example" } } } }))
    assert.matches("needs the block's warmup", err_of({ pools = { a = { { source = "127.0.0.2", warmup = "2026-01-01" } } } }))
    assert.matches("expected a start date", err_of({ pools = { a = { { source = "127.0.0.2", warmup = "soon" } } },
      warmup = { schedule = { default = { 1 } } } }))
    assert.matches("pool_header' needs pools", err_of({ pool_header = "X-Virtual-MTA" }))
    assert.matches("route_pools_spec.lua:%d+", err_of({ pools = { a = {} } }))
  end)
end)
