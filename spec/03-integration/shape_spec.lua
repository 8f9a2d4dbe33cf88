-- Traffic shaping measured at a real peer: the aiosmtpd sink
-- (spec/tools/sink.py) timestamps every connection and message, and the
-- figures are taken from its record, not from Moonpost's own counters.
local H = require "helpers"

local TIMEOUTS = { connect = 2, greeting = 2, ehlo = 2, mail = 2, rcpt = 2, data = 2, block = 2, done = 2 }

-- An in-process MTA relaying to the sink through moonpost.shape.
local function shaped_mta(dir, port, shape_opts, route_opts)
  local ro = { relay = "127.0.0.1:" .. port, idle_timeout = "2s", timeouts = TIMEOUTS }
  for k, v in pairs(route_opts or {}) do ro[k] = v end
  return H.start_mta({}, function(m)
    m:use(require("moonpost.route").smtp(ro))
    m:use(require("moonpost.shape").setup(shape_opts))
  end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" }, max_age = "1h" } })
end

local with_sink = H.with_sink

local function inject(port, total, rcpt)
  local st = H.inject({ port = port, sessions = 8, total = total, rcpt = rcpt,
    body = "shaping test\r\n" })
  H.wait_for(function() return st.running == 0 end, 60)
  -- sessions in flight may get a few more in than asked for
  assert.is_true(st.nacked >= total)
  return st.nacked
end

local function sorted_times(list)
  local t = {}
  for i, ev in ipairs(list) do t[i] = ev.t end
  table.sort(t)
  return t
end

describe("moonpost.shape", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-shape") end)
  after_each(function() H.rm_rf(dir) end)

  it("holds a site limited to 100 msg/s to 100 +- 10 msg/s over 10 s", function()
    with_sink({}, function(sink)
      local mta, port = shaped_mta(dir, sink.port, {
        destinations = { limited = { domains = { "rate.test" }, rate = "100/s" } },
      })
      -- more than 12 s of work at the limit, queued faster than it can leave
      inject(port, 1300, function(seq) return "user" .. seq .. "@rate.test" end)
      H.wait_for(function() return #sink.messages() >= 1150 end, 40)
      local t = sorted_times(sink.messages())
      local first = t[1]
      local n = 0
      for _, x in ipairs(t) do
        if x >= first and x < first + 10 then n = n + 1 end
      end
      print(string.format("\n    shaped to 100/s: %d messages in the first 10 s at the sink (%.1f msg/s)",
        n, n / 10))
      assert.is_true(n >= 900 and n <= 1100, "messages in 10 s: " .. n)
      -- and over any 1 s window after the first, never far above the limit
      local j = 1
      local peak = 0
      for i = 1, #t do
        while t[i] - t[j] >= 1 do j = j + 1 end
        if t[i] >= first + 1 and i - j + 1 > peak then peak = i - j + 1 end
      end
      assert.is_true(peak <= 130, "peak in one second: " .. peak)
      H.stop_mta(mta)
    end, 90)
  end)

  it("never opens more connections to a site than its cap, and uses them all", function()
    with_sink({}, function(sink)
      local mta, port = shaped_mta(dir, sink.port, {
        destinations = { capped = { domains = { "cap.test" }, max_connections = 3,
          max_messages_per_connection = 10 } },
      })
      local n = inject(port, 300, function(seq) return "user" .. seq .. "@cap.test" end)
      H.wait_for(function() return #sink.messages() >= n end, 60)
      assert.equal(n, #sink.messages())
      local peak, connects = 0, 0
      for _, ev in ipairs(sink.events("connect")) do
        connects = connects + 1
        if ev.open > peak then peak = ev.open end
      end
      print(string.format("\n    cap 3: peak %d concurrent connections over %d connections", peak, connects))
      assert.is_true(peak <= 3, "peak connections: " .. peak)
      assert.equal(3, peak)
      -- max_messages_per_connection: at least 300 / 10 connections
      assert.is_true(connects >= 30, "connections: " .. connects)
      H.stop_mta(mta)
    end, 90)
  end)

  it("suspends a site on a matching reply for the rule's duration, then lifts", function()
    with_sink({}, function(sink)
      local mta, port = shaped_mta(dir, sink.port, {
        destinations = { yahooish = { domains = { "rule.test" },
          rules = { { match = "%[TSS04%]", action = "suspend", duration = "3s" } } } },
      })
      assert.equal(250, H.send(port, { to = "throttle1-a@rule.test" }))
      H.wait_for(function() return #sink.events("throttled") >= 1 end, 10)
      local fired = sink.events("throttled")[1].t
      H.wait_for(function() return H.log("suspended for 3s") end, 5)
      -- mail for the same site, sent while it is suspended
      for i = 1, 5 do assert.equal(250, H.send(port, { to = "ok" .. i .. "@rule.test" })) end
      H.wait_for(function() return #sink.messages() >= 6 end, 15)
      local msgs = sink.messages()
      assert.equal(6, #msgs)
      for _, m in ipairs(msgs) do
        -- nothing reached the site during the suspension ...
        assert.is_true(m.t >= fired + 2.9, string.format("delivered %.2f s after the rule fired", m.t - fired))
        -- ... and it lifted on time (a short margin for the retry tick)
        assert.is_true(m.t <= fired + 6, string.format("delivered %.2f s after the rule fired", m.t - fired))
      end
      local st = mta.shaper:state()
      local g = st["ready:default>rule.test"] or st["ready:default>yahooish"]
      assert.is_table(g)
      assert.equal(1, g.stats.suspended)
      assert.equal(0, g.suspended_for)
      H.stop_mta(mta)
    end, 60)
  end)

  it("defers the reply that set off a suspend rule, even a 5xx (Microsoft's S3150, Yahoo's TSS09)", function()
    with_sink({}, function(sink)
      local mta, port = shaped_mta(dir, sink.port, {
        destinations = { strict = { domains = { "rule.test" },
          rules = { { match = "no such user", action = "suspend", duration = "2s" } } } },
      })
      assert.equal(250, H.send(port, { to = "r550-a@rule.test" }))
      assert.is_true(H.wait_for(function() return H.log("suspended for 2s") ~= "" end, 10))
      assert.is_true(H.wait_for(function() return H.log("to=<r550-a@rule.test> deferred") ~= "" end, 10))
      assert.matches("451 4%.1%.1", H.log("to=<r550-a@rule.test> deferred"))
      assert.equal("", H.log("to=<r550-a@rule.test> bounced"))
      assert.equal(1, mta.spool:count())
      assert.equal(0, #sink.messages())
      H.stop_mta(mta)
    end, 30)
  end)

  -- A message with a recipient a gate holds and one another site deferred:
  -- the deferred one keeps its own retry time, whatever the gate does.
  it("retries a recipient of another site on its own schedule while the gate holds one of the message", function()
    with_sink({}, function(sink)
      local mta, port = shaped_mta(dir, sink.port, {
        destinations = { yahooish = { domains = { "rule.test" },
          rules = { { match = "%[TSS04%]", action = "suspend", duration = "40s" } } } },
      })
      assert.equal(250, H.send(port, { to = "throttle1-a@rule.test" }))
      H.wait_for(function() return H.log("suspended for 40s") ~= "" end, 10)
      -- other.test answers 451 twice, then takes it (retry: 1 s)
      assert.equal(250, H.send(port, { to = { "flaky2-z@other.test", "held@rule.test" } }))
      assert.is_true(H.wait_for(function()
        for _, m in ipairs(sink.messages()) do
          if m.rcpts[1] == "flaky2-z@other.test" then return true end
        end
      end, 15), "the other site's recipient waited for the gate")
      -- the held one has not gone anywhere (the site is still suspended)
      for _, m in ipairs(sink.messages()) do assert.is_nil(m.data:find("held@rule.test", 1, true)) end
      -- (with the message that tripped the rule)
      assert.equal(2, mta.spool:count())
      H.stop_mta(mta)
    end, 60)
  end)

  -- docs/shape.md: "A message that reaches its max_age while held expires
  -- as usual (4.4.7)", even though its gate stays closed (an hour here).
  it("expires a message held by a closed gate at max_age, with its DSN", function()
    with_sink({}, function(sink)
      local mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink.port, idle_timeout = "2s",
          timeouts = TIMEOUTS })
        m:use(require("moonpost.shape").setup {
          destinations = { hourly = { domains = { "hourly.test" }, rate = "1/h" } } })
      end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" }, max_age = "2s" } })
      -- the first takes the hour's token; the second is held for the next
      assert.equal(250, H.send(port, { to = "a@hourly.test" }))
      assert.equal(250, H.send(port, { from = "s2@client.test", to = "b@hourly.test" }))
      assert.is_true(H.wait_for(function()
        for _, m in ipairs(sink.messages()) do
          if m.rcpts[1] == "s2@client.test" then return true end
        end
      end, 15), "b@hourly.test did not expire while held")
      assert.matches("bounced: 4%.4%.7 message expired: held: waiting for ready:", H.log("to=<b@hourly.test> bounced"))
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 5))
      local got = {}
      for _, m in ipairs(sink.messages()) do got[#got + 1] = m.rcpts[1] end
      table.sort(got)
      assert.same({ "a@hourly.test", "s2@client.test" }, got)
      H.stop_mta(mta)
    end, 60)
  end)

  it("slows a site down on a matching reply, and bounces on a bounce rule", function()
    with_sink({}, function(sink)
      local bounced = {}
      local mta, port = shaped_mta(dir, sink.port, {
        destinations = { slow = { domains = { "slow.test" },
          rules = { { contains = "[TSS04]", action = "slow", rate = "2/s", duration = "30s" } } },
          hard = { domains = { "hard.test" }, rules = { { regex = [[^451 4\.2\.0 try\s+again]], action = "bounce" } } } },
      })
      mta:on("delivery_bounced", function(_, r, res) bounced[r.address] = res end)
      assert.equal(250, H.send(port, { to = "throttle1-a@slow.test" }))
      H.wait_for(function() return #sink.events("throttled") >= 1 end, 10)
      H.wait_for(function() return H.log("slowed to 2/1s") end, 5)
      local n = inject(port, 10, function(seq) return "user" .. seq .. "@slow.test" end)
      H.wait_for(function() return #sink.messages() >= n + 1 end, 30)
      local t = sorted_times(sink.messages())
      -- n + 1 messages at 2/s (one token of burst): about n / 2 s from first to last
      assert.is_true(t[#t] - t[1] >= (n - 1) / 2, string.format("%d messages in %.2f s", n + 1, t[#t] - t[1]))
      -- a 451 that a bounce rule matches is a permanent failure
      assert.equal(250, H.send(port, { to = "r451-x@hard.test" }))
      H.wait_for(function() return bounced["r451-x@hard.test"] ~= nil end, 10)
      assert.equal(550, bounced["r451-x@hard.test"].code)
      assert.equal("5.2.0", bounced["r451-x@hard.test"].enhanced)
      H.stop_mta(mta)
    end, 60)
  end)

  it("reports configuration mistakes with the field", function()
    local shape = require "moonpost.shape"
    local function err_of(opts)
      local ok, err = pcall(shape.setup, opts)
      assert.is_false(ok)
      return tostring(err)
    end
    assert.matches("field 'rate': expected a rate", err_of({ destinations = { x = { domains = { "a" }, rate = "fast" } } }))
    assert.matches("unknown field 'speed'", err_of({ destinations = { x = { domains = { "a" }, speed = 1 } } }))
    assert.matches("action 'slow' needs a rate",
      err_of({ rules = { { match = "x", action = "slow", duration = "1m" } } }))
    assert.matches("give 'domains', 'mx' or both", err_of({ destinations = { x = { rate = "1/s" } } }))
    assert.matches("bad pattern", err_of({ rules = { { match = "[", action = "bounce" } } }))
    assert.matches("field 'regex'", err_of({ rules = { { regex = "(a", action = "bounce" } } }))
    assert.matches("give one of", err_of({ rules = { { regex = "a", match = "a", action = "bounce" } } }))
    assert.matches("shape_spec.lua:%d+", err_of({ tenants = { a = { rate = "1/x" } } }))
  end)

  it("ships destination entries for Gmail, Microsoft, Yahoo and Apple, matched by MX", function()
    local block = require("moonpost.shape").setup({ defaults = true })
    local sh = block.shaper
    assert.equal("gmail", sh:destination("example.org", { "aspmx.l.google.com" }).name)
    assert.equal("gmail", sh:destination("gmail.com").name)
    assert.equal("microsoft", sh:destination("contoso.com", { "contoso-com.mail.protection.outlook.com" }).name)
    assert.equal("yahoo", sh:destination("aol.com").name)
    assert.equal("yahoo", sh:destination("x.example", { "mta5.am0.yahoodns.net" }).name)
    assert.equal("apple", sh:destination("me.com").name)
    assert.is_nil(sh:destination("example.net", { "mx.example.net" }))
    -- "notgoogle.com" is not a subdomain of google.com
    assert.is_nil(sh:destination("example.net", { "mx.notgoogle.com" }))
  end)

  it("moonpost check refuses a tenant that is not declared, in shape tenants and route.smtp pools, at the policy's line", function()
    H.run(function()
      local tail = " is not declared in moonpost.new { tenants = ... } (declared: acme, beta)"
      for _, case in ipairs({
        { "bad_shape_tenant.lua", 3, "shape: field 'tenants': tenant 'acmee'" .. tail },
        { "bad_route_tenant.lua", 3, "route.smtp: field 'tenant_pools': tenant 'acmee'" .. tail },
        { "bad_pool_tenant.lua", 3, "route.smtp: field 'pools' [p]: field 'tenants': tenant 'betta'" .. tail },
      }) do
        local path = "spec/fixtures/policies/" .. case[1]
        local code, out, err = H.exec(H.root .. "/scripts/moonpost", { "check", path }, { cwd = H.root, timeout = 30 })
        assert.equal(1, code, path)
        assert.equal("", out)
        local want = "moonpost: " .. path .. ":" .. case[2] .. ": " .. case[3]
        assert.equal(want, err:sub(1, #want), err)
        assert.falsy(err:find("stack traceback", 1, true))
      end
    end)
  end)

  it("matches an internationalized domain in either form, written either way in the policy", function()
    local sh = require("moonpost.shape").setup({ destinations = {
      de = { domains = { "bücher.example" }, rate = "1/m" },
      mx = { domains = { "XN--mller-kva.example" }, rate = "1/m" } } }).shaper
    for _, d in ipairs({ "bücher.example", "xn--bcher-kva.example", "BÜCHER.example", "Xn--Bcher-Kva.Example" }) do
      assert.equal("de", (sh:destination(d) or {}).name, d)
    end
    for _, d in ipairs({ "müller.example", "xn--mller-kva.example" }) do
      assert.equal("mx", (sh:destination(d) or {}).name, d)
    end
    -- one domain, two spellings: a duplicate
    local ok, err = pcall(require("moonpost.shape").setup, { destinations = {
      a = { domains = { "bücher.example" } }, b = { domains = { "xn--bcher-kva.example" } } } })
    assert.is_false(ok)
    assert.matches("domain xn%-%-bcher%-kva.example is already in destination a", tostring(err))
  end)
end)
