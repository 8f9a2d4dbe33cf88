-- runtime/metrics.lua: the registry and the text exposition format 0.0.4
-- (HELP/TYPE lines, escaping, histogram buckets, the prefix) and the label
-- caps (top-K with "other").
local metrics = require "moonpost.runtime.metrics"

local function lines(text)
  local out = {}
  for l in text:gmatch("([^\n]*)\n") do out[#out + 1] = l end
  return out
end

-- The sample lines of a render, as name{labels} -> value text.
local function samples(text)
  local out = {}
  for _, l in ipairs(lines(text)) do
    if l:sub(1, 1) ~= "#" and l ~= "" then
      local k, v = l:match("^(.-) (%S+)$")
      out[k] = v
    end
  end
  return out
end

describe("moonpost.runtime.metrics", function()
  describe("render()", function()
    it("render() writes HELP and TYPE lines, then the samples, with the prefix", function()
      local reg = metrics.new()
      local c = reg:counter("messages_total", "Messages received", { "tenant", "listener" })
      c:inc("acme", "mx")
      c:add(2, "acme", "mx")
      c:inc(nil, "mx")
      local text = reg:render()
      assert.equal(table.concat({
        "# HELP moonpost_messages_total Messages received",
        "# TYPE moonpost_messages_total counter",
        'moonpost_messages_total{tenant="",listener="mx"} 1',
        'moonpost_messages_total{tenant="acme",listener="mx"} 3',
        "",
      }, "\n"), text)
    end)

    it("render() uses the configured prefix, and no prefix for raw families", function()
      local reg = metrics.new { prefix = "postmta" }
      reg:gauge("queue_depth", "Depth"):set(4)
      reg:gauge("process_start_time_seconds", "Start", nil, { raw = true }):set(1700000000.5)
      local s = samples(reg:render())
      assert.equal("4", s.postmta_queue_depth)
      assert.equal("1700000000.5", s.process_start_time_seconds)
      reg:configure { prefix = "moonpost" }
      assert.equal("4", samples(reg:render()).moonpost_queue_depth)
    end)

    it("render() escapes backslash, double quote and newline in label values, and in HELP", function()
      local reg = metrics.new()
      reg:counter("x_total", "a \\ b\nc", { "v" }):inc('q"\\\nz')
      local l = lines(reg:render())
      assert.equal("# HELP moonpost_x_total a \\\\ b\\nc", l[1])
      assert.equal('moonpost_x_total{v="q\\"\\\\\\nz"} 1', l[3])
    end)

    it("render() writes cumulative buckets with le, +Inf, _sum and _count", function()
      local reg = metrics.new()
      local h = reg:histogram("latency_seconds", "Latency", { "tenant" }, { buckets = { 0.1, 1, 10 } })
      for _, v in ipairs({ 0.05, 0.1, 0.5, 2, 50 }) do h:observe(v, "a") end
      local l = lines(reg:render())
      assert.same({
        "# HELP moonpost_latency_seconds Latency",
        "# TYPE moonpost_latency_seconds histogram",
        'moonpost_latency_seconds_bucket{tenant="a",le="0.1"} 2', -- le is inclusive
        'moonpost_latency_seconds_bucket{tenant="a",le="1"} 3',
        'moonpost_latency_seconds_bucket{tenant="a",le="10"} 4',
        'moonpost_latency_seconds_bucket{tenant="a",le="+Inf"} 5',
        'moonpost_latency_seconds_sum{tenant="a"} 52.65',
        'moonpost_latency_seconds_count{tenant="a"} 5',
      }, l)
    end)

    it("render() writes a histogram without labels", function()
      local reg = metrics.new()
      reg:histogram("h", "H", nil, { buckets = { 1 } }):observe(3)
      local s = samples(reg:render())
      assert.equal("0", s['moonpost_h_bucket{le="1"}'])
      assert.equal("1", s['moonpost_h_bucket{le="+Inf"}'])
      assert.equal("3", s.moonpost_h_sum)
      assert.equal("1", s.moonpost_h_count)
    end)

    it("render() writes exact floats, integers without a decimal point, and NaN/Inf", function()
      assert.equal("0.1", metrics.number(0.1))
      assert.equal("3", metrics.number(3))
      assert.equal("1e+300", metrics.number(1e300))
      assert.equal("+Inf", metrics.number(math.huge))
      assert.equal("-Inf", metrics.number(-math.huge))
      assert.equal("NaN", metrics.number(0 / 0))
      assert.equal(1 / 3, tonumber(metrics.number(1 / 3)))
    end)

    it("render() runs collect functions first, and survives one that fails", function()
      local reg = metrics.new()
      local g = reg:gauge("depth", "Depth", { "q" })
      reg:collect(function() error("boom") end)
      reg:collect(function()
        g:clear()
        g:set(7, "a")
      end)
      assert.equal("7", samples(reg:render())['moonpost_depth{q="a"}'])
    end)

    it("gauges: inc, dec, add, set, and children kept by the caller", function()
      local reg = metrics.new()
      local g = reg:gauge("open", "Open", { "direction" })
      local child = g:child("in")
      child:inc()
      child:inc()
      child:dec()
      g:add(5, "out")
      g:dec("out")
      local s = samples(reg:render())
      assert.equal("1", s['moonpost_open{direction="in"}'])
      assert.equal("4", s['moonpost_open{direction="out"}'])
    end)
  end)

  describe("registration", function()
    it("counter() returns the same family for the same name, type and labels", function()
      local reg = metrics.new()
      assert.equal(reg:counter("a_total", "A", { "x" }), reg:counter("a_total", "A", { "x" }))
    end)

    it("raises for bad names, bad labels, a clash and bad buckets", function()
      local reg = metrics.new()
      reg:counter("a_total", "A", { "x" })
      assert.has_error(function() reg:gauge("a_total", "A", { "x" }) end,
        "metrics: a_total is already registered as a counter with labels {x}")
      assert.has_error(function() reg:counter("1bad", "B") end)
      assert.has_error(function() reg:counter("ok", "B", { "bad-label" }) end)
      assert.has_error(function() reg:histogram("h", "H", { "le" }) end)
      assert.has_error(function() reg:histogram("h2", "H", nil, { buckets = { 1, 1 } }) end)
      assert.has_error(function() metrics.new { prefix = "no-dash" } end)
    end)

    it("child() of a family with a capped label raises", function()
      local reg = metrics.new { caps = { tenant = 2 } }
      local c = reg:counter("m_total", "M", { "tenant" })
      assert.has_error(function() c:child("a") end)
    end)
  end)

  describe("inherit (a reload)", function()
    it("takes over the families registered again the same way, and starts the changed ones anew", function()
      local old = metrics.new()
      local c = old:counter("sent_total", "S", { "tenant" })
      c:add(5, "acme")
      old:counter("kept_total", "K"):inc()
      old:counter("relabelled_total", "R", { "a" }):inc("x")
      old:gauge("open", "O"):set(3)
      local h = old:histogram("lat_seconds", "L", { "tenant" })
      h:observe(0.2, "acme")
      old:histogram("own_seconds", "B", nil, { buckets = { 1, 2 } }):observe(1.5)
      local new = metrics.new { inherit = old }
      local c2 = new:counter("sent_total", "S", { "tenant" })
      assert.equal(c, c2)
      new:counter("kept_total", "K")
      new:counter("relabelled_total", "R", { "b" })
      new:gauge("open", "O")
      new:histogram("lat_seconds", "L", { "tenant" })
      new:histogram("own_seconds", "B", nil, { buckets = { 1, 5 } })
      -- the old policy's sessions still count, in the same series
      c:inc("acme")
      new:settle()
      local s = samples(new:render())
      assert.equal("6", s['moonpost_sent_total{tenant="acme"}'])
      assert.equal("1", s["moonpost_kept_total"])
      assert.is_nil(s['moonpost_relabelled_total{a="x"}'])
      assert.equal("3", s["moonpost_open"])
      assert.equal("1", s['moonpost_lat_seconds_count{tenant="acme"}'])
      -- other buckets: another instrument, from zero
      assert.equal("0", s["moonpost_own_seconds_count"])
      assert.is_nil(new.inherit)
    end)

    it("a histogram on the registry's buckets starts over at settle() only when they changed", function()
      local old = metrics.new()
      old:histogram("lat_seconds", "L"):observe(0.2)
      local same = metrics.new { inherit = old }
      same:histogram("lat_seconds", "L")
      same:configure { buckets = metrics.DEFAULT_BUCKETS }
      same:settle()
      assert.equal("1", samples(same:render())["moonpost_lat_seconds_count"])
      local other = metrics.new { inherit = same, buckets = { 1, 10 } }
      other:histogram("lat_seconds", "L")
      assert.equal("1", samples(other:render())["moonpost_lat_seconds_count"])
      other:settle()
      local s = samples(other:render())
      assert.equal("0", s["moonpost_lat_seconds_count"])
      assert.equal("0", s['moonpost_lat_seconds_bucket{le="10"}'])
    end)
  end)

  describe("caps", function()
    it("fold values past the cap into other; totals stay exact", function()
      local reg = metrics.new { caps = { domain = 3 } }
      local c = reg:counter("delivered_total", "D", { "domain" })
      for i = 1, 10000 do c:inc("d" .. i .. ".test") end
      local s = samples(reg:render())
      local n, sum = 0, 0
      for _, v in pairs(s) do
        n = n + 1
        sum = sum + tonumber(v)
      end
      assert.equal(4, n) -- 3 domains and other
      assert.equal(10000, sum)
      assert.equal("9997", s['moonpost_delivered_total{domain="other"}'])
    end)

    it("a busy value past the cap takes the place of the quietest; its old series goes into other", function()
      local reg = metrics.new { caps = { domain = 2 } }
      local c = reg:counter("delivered_total", "D", { "domain", "class" })
      c:inc("quiet.test", "x")
      for _ = 1, 10 do c:inc("busy.test", "x") end
      -- a long tail of one-off domains: none of them is promoted
      for i = 1, 1000 do c:inc("tail" .. i .. ".test", "x") end
      local s = samples(reg:render())
      assert.equal("1", s['moonpost_delivered_total{domain="quiet.test",class="x"}'])
      -- a new domain that sends a lot does get a series of its own
      for _ = 1, 50 do c:inc("new.test", "x") end
      s = samples(reg:render())
      assert.is_nil(s['moonpost_delivered_total{domain="quiet.test",class="x"}'])
      assert.equal("10", s['moonpost_delivered_total{domain="busy.test",class="x"}'])
      local new = tonumber(s['moonpost_delivered_total{domain="new.test",class="x"}'])
      local other = tonumber(s['moonpost_delivered_total{domain="other",class="x"}'])
      assert.is_true(new > 0 and new < 50)
      assert.equal(1 + 10 + 1000 + 50, new + other + 10)
    end)

    it("fold histograms: buckets, sums and counts are added into other", function()
      local reg = metrics.new { caps = { tenant = 1 } }
      local h = reg:histogram("lat", "L", { "tenant" }, { buckets = { 1 } })
      h:observe(0.5, "first")
      for _ = 1, 10 do h:observe(2, "second") end
      local s = samples(reg:render())
      assert.is_nil(s['moonpost_lat_count{tenant="first"}'])
      local total = tonumber(s['moonpost_lat_count{tenant="other"}']) + tonumber(s['moonpost_lat_count{tenant="second"}'])
      assert.equal(11, total)
      local le1 = tonumber(s['moonpost_lat_bucket{tenant="other",le="1"}'])
      assert.equal(1, le1)
    end)

    it("gauges keep the largest values at each render and sum the rest into other", function()
      local reg = metrics.new { caps = { tenant = 2, domain = 3 } }
      local g = reg:gauge("queue_depth", "Q", { "tenant", "domain" })
      for i = 1, 10000 do g:set(i % 7, "t" .. (i % 5), "d" .. i .. ".test") end
      local s = samples(reg:render())
      local n, sum, expect = 0, 0, 0
      for _, v in pairs(s) do
        n = n + 1
        sum = sum + tonumber(v)
      end
      for i = 1, 10000 do expect = expect + i % 7 end
      assert.equal(expect, sum)
      assert.is_true(n <= 3 * 4, "series: " .. n)
      assert.equal(n, reg:series())
    end)

    it("a tracked value that went quiet is replaced after half_life", function()
      local reg = metrics.new { caps = { tenant = 1 }, half_life = 0 }
      local c = reg:counter("m_total", "M", { "tenant" })
      for _ = 1, 100 do c:inc("old") end
      for _ = 1, 10 do c:inc("new") end
      local s = samples(reg:render())
      assert.is_nil(s['moonpost_m_total{tenant="old"}'])
      assert.is_truthy(s['moonpost_m_total{tenant="new"}'])
    end)
  end)
end)
