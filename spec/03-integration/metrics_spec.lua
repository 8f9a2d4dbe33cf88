-- Prometheus metrics (moonpost.metrics): GET /metrics over a real socket,
-- parsed by Debian's python3-prometheus-client, after real traffic through
-- the aiosmtpd sink: counters, the latency histogram, queue depths, the
-- prefix, TLS and DKIM counts, and the label caps.
local H = require "helpers"
local http = require "moonpost.runtime.http"
local cjson = require "cjson"

-- Fetch the URL with urllib and parse it with prometheus_client's parser:
-- { content_type, families = { name = { type, samples = { { name, labels, value } } } } }.
local SCRAPE = [==[
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
    ctype = r.headers.get("Content-Type")
    text = r.read().decode("utf-8")
fams = {}
for f in text_string_to_metric_families(text):
    fams[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
print(json.dumps({"content_type": ctype, "families": fams, "lines": len(text.splitlines())}))
]==]

local function scrape(port)
  local code, out, err = H.exec(H.python, { "-c", SCRAPE, "http://127.0.0.1:" .. port .. "/metrics" },
    { timeout = 60 })
  assert(code == 0, "scrape failed: " .. err)
  return cjson.decode(out)
end

-- value(s, family, sample, labels) -> the value of the sample whose labels
-- include `labels` (nil: none such); sum(...) -> the sum over all of them.
local function matching(s, family, sample, labels)
  local f = assert(s.families[family], "no family " .. family)
  local out = {}
  for _, x in ipairs(f.samples) do
    if x[1] == sample then
      local ok = true
      for k, v in pairs(labels or {}) do
        if x[2][k] ~= v then ok = false end
      end
      if ok then out[#out + 1] = x end
    end
  end
  return out
end

local function value(s, family, sample, labels)
  local m = matching(s, family, sample, labels)
  assert(#m <= 1, "more than one sample of " .. sample)
  return m[1] and m[1][3]
end

local function sum(s, family, sample, labels)
  local t = 0
  for _, x in ipairs(matching(s, family, sample, labels)) do t = t + x[3] end
  return t
end

local TIMEOUTS = { connect = 2, greeting = 2, ehlo = 2, mail = 2, rcpt = 2, data = 2, block = 2, done = 2 }

-- An MTA of tenant "acme" relaying to the sink, with an HTTP listener.
-- Returns mta, smtp port, http port.
local function relay_mta(dir, sink_port, opts)
  opts = opts or {}
  local accept = { tenant = "acme" }
  for k, v in pairs(opts.accept or {}) do accept[k] = v end
  local mta, port = H.start_mta(accept, function(m)
    if opts.metrics then m:use(require("moonpost.metrics").setup(opts.metrics)) end
    local ro = { relay = "127.0.0.1:" .. sink_port, idle_timeout = "2s", timeouts = TIMEOUTS }
    for k, v in pairs(opts.route or {}) do ro[k] = v end
    m:use(require("moonpost.route").smtp(ro))
    if opts.setup then opts.setup(m) end
  end, { http = "127.0.0.1:0", tenants = { acme = {} }, spool = { dir = dir .. "/spool", min_free = 0 },
    queue = { retry = opts.retry or { "1s" }, max_age = "1h" } })
  return mta, port, mta:http_addresses()[1].port
end

-- What the families must be, by the parser's name (counters without _total).
local FAMILIES = {
  moonpost_messages = "counter",
  moonpost_messages_delivered = "counter",
  moonpost_messages_deferred = "counter",
  moonpost_messages_bounced = "counter",
  moonpost_messages_suppressed = "counter",
  moonpost_delivery_latency_seconds = "histogram",
  moonpost_delivery_attempts = "counter",
  moonpost_queue_depth = "gauge",
  moonpost_connections = "counter",
  moonpost_connections_open = "gauge",
  moonpost_smtp_sessions_parked = "gauge",
  moonpost_tls_handshakes = "counter",
  moonpost_tls_handshake_failures = "counter",
  moonpost_spool_messages = "gauge",
  moonpost_spool_bytes = "gauge",
  moonpost_spool_segments = "gauge",
  moonpost_spool_written_bytes = "counter",
  moonpost_spool_fsync_batches = "counter",
  moonpost_spool_fsyncs = "counter",
  moonpost_spool_compactions = "counter",
  moonpost_dkim_signatures = "counter",
  moonpost_dkim_failures = "counter",
  moonpost_dns_queries = "counter",
  moonpost_dns_cache_hits = "counter",
  moonpost_dns_queries_sent = "counter",
  moonpost_lua_memory_bytes = "gauge",
  moonpost_lua_gc_cycles = "counter",
  moonpost_lua_gc_pause_percent = "gauge",
  moonpost_build_info = "gauge",
  process_start_time_seconds = "gauge",
  process_resident_memory_bytes = "gauge",
  process_cpu_seconds = "counter",
}

describe("moonpost.metrics", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-metrics") end)
  after_each(function() H.rm_rf(dir) end)

  it("GET /metrics: every family with its type; counters, latency and queue depth follow real traffic", function()
    local N = 6
    H.with_sink(function(sink)
      local mta, port, hport = relay_mta(dir, sink.port)
      local before = scrape(hport)
      assert.equal("text/plain; version=0.0.4; charset=utf-8", before.content_type)
      for name, kind in pairs(FAMILIES) do
        assert.is_table(before.families[name], "missing family " .. name)
        assert.equal(kind, before.families[name].type, name)
      end
      local out_before = sum(before, "moonpost_connections", "moonpost_connections_total", { direction = "out" })
      -- N messages, each to a recipient that is delivered, one that is
      -- refused with 550 5.1.1 and one refused once with 451 (retried after 1 s)
      for i = 1, N do
        assert.equal(250, (H.send(port, { to = { "ok-" .. i .. "@x.test", "r550-" .. i .. "@x.test",
          "flaky1-" .. i .. "@y.test" }, rcpt_params = "NOTIFY=NEVER" })))
      end
      -- while the flaky ones wait for their retry, the queue has them
      local seen = H.wait_for(function()
        local _, body = http.request("127.0.0.1", hport, "GET", "/metrics")
        local n = body and tonumber(body:match('moonpost_queue_depth{tenant="acme",domain="y.test"} (%d+)'))
        return n and n > 0
      end, 10)
      assert.is_true(seen, "queue_depth for y.test never above 0")
      assert.is_true(H.wait_for(function()
        return #sink.messages() == 2 * N and mta.spool:count() == 0 and mta:sessions() == 0
      end, 20))
      -- (a cycle of the collector, whatever this process has allocated since)
      collectgarbage()
      local s = scrape(hport)
      assert.equal(N, value(s, "moonpost_messages", "moonpost_messages_total",
        { tenant = "acme", listener = mta:addresses()[1].name }))
      assert.equal(N, value(s, "moonpost_messages_delivered", "moonpost_messages_delivered_total",
        { tenant = "acme", domain = "x.test" }))
      assert.equal(N, value(s, "moonpost_messages_delivered", "moonpost_messages_delivered_total",
        { tenant = "acme", domain = "y.test" }))
      assert.equal(N, value(s, "moonpost_messages_bounced", "moonpost_messages_bounced_total",
        { tenant = "acme", class = "invalid-recipient", kind = "hard" }))
      assert.equal(N, sum(s, "moonpost_messages_bounced", "moonpost_messages_bounced_total"))
      assert.equal(N, value(s, "moonpost_messages_deferred", "moonpost_messages_deferred_total",
        { tenant = "acme", domain = "y.test" }))
      assert.equal(2 * N, value(s, "moonpost_delivery_attempts", "moonpost_delivery_attempts_total"))
      -- the histogram: one observation per delivery, cumulative buckets
      local lat = "moonpost_delivery_latency_seconds"
      assert.equal(2 * N, value(s, lat, lat .. "_count", { tenant = "acme" }))
      assert.equal(2 * N, value(s, lat, lat .. "_bucket", { tenant = "acme", le = "+Inf" }))
      local last = 0
      for _, b in ipairs(matching(s, lat, lat .. "_bucket", { tenant = "acme" })) do
        assert.is_true(b[3] >= last, "buckets must be cumulative")
        last = b[3]
      end
      -- the retried half took more than its 1 s retry interval
      assert.is_true(value(s, lat, lat .. "_bucket", { tenant = "acme", le = "1" }) <= N)
      assert.is_true(value(s, lat, lat .. "_sum", { tenant = "acme" }) >= N)
      -- the queue is empty again
      assert.equal(0, sum(s, "moonpost_queue_depth", "moonpost_queue_depth"))
      assert.equal(0, value(s, "moonpost_spool_messages", "moonpost_spool_messages"))
      -- connections: one per message in, at least one out; none open inbound
      assert.equal(N, value(s, "moonpost_connections", "moonpost_connections_total", { direction = "in" }))
      assert.is_true(value(s, "moonpost_connections", "moonpost_connections_total", { direction = "out" })
        > out_before)
      assert.equal(0, value(s, "moonpost_connections_open", "moonpost_connections_open", { direction = "in" }))
      -- the spool: N messages written and synced in batches
      assert.is_true(value(s, "moonpost_spool_fsync_batches", "moonpost_spool_fsync_batches_total") >= 1)
      assert.is_true(value(s, "moonpost_spool_written_bytes", "moonpost_spool_written_bytes_total") > 0)
      assert.is_true(value(s, "moonpost_spool_segments", "moonpost_spool_segments") >= 1)
      assert.is_true(value(s, "moonpost_lua_memory_bytes", "moonpost_lua_memory_bytes") > 0)
      -- the collector ran between the scrapes, and its pause is what gc_pause allows
      assert.is_true(value(s, "moonpost_lua_gc_cycles", "moonpost_lua_gc_cycles_total")
        > value(before, "moonpost_lua_gc_cycles", "moonpost_lua_gc_cycles_total"))
      local pause = value(s, "moonpost_lua_gc_pause_percent", "moonpost_lua_gc_pause_percent")
      assert.is_true(pause >= 110 and pause <= 400, "pause " .. pause)
      local started = value(s, "process_start_time_seconds", "process_start_time_seconds")
      assert.is_true(started > 1.6e9 and started <= os.time() + 1)
      H.stop_mta(mta)
    end)
  end)

  it("smtp_sessions_parked follows the sessions that park while idle and wake", function()
    H.with_sink(function(sink)
      local mta, port, hport = relay_mta(dir, sink.port, { metrics = {}, accept = { idle_park_after = 0.05 } })
      local ps = H.ehlo_sessions(port, 3)
      local function parked()
        return value(scrape(hport), "moonpost_smtp_sessions_parked", "moonpost_smtp_sessions_parked")
      end
      assert.is_true(H.wait_for(function() return parked() == 3 end, 10))
      -- one opens a transaction (it waits unparked for RCPT), one leaves
      ps[1]:cmd("MAIL FROM:<a@c.test>") ps[1]:expect(250)
      ps[2]:cmd("QUIT") ps[2]:expect(221)
      ps[2]:close()
      assert.is_true(H.wait_for(function() return parked() == 1 end, 10))
      local s = scrape(hport)
      assert.equal(2, value(s, "moonpost_connections_open", "moonpost_connections_open", { direction = "in" }))
      ps[1]:cmd("RSET") ps[1]:expect(250)
      assert.is_true(H.wait_for(function() return parked() == 2 end, 10))
      ps[1]:close() ps[3]:close()
      assert.is_true(H.wait_for(function() return parked() == 0 and mta:sessions() == 0 end, 10))
      H.stop_mta(mta)
    end)
  end)

  it("setup { prefix = \"postmta\" } names every family postmta_*", function()
    H.with_sink(function(sink)
      local mta, port, hport = relay_mta(dir, sink.port, { metrics = { prefix = "postmta" } })
      assert.equal(250, (H.send(port, { to = "a@x.test" })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 and mta.spool:count() == 0 end, 10))
      local s = scrape(hport)
      local n = 0
      for name in pairs(s.families) do
        n = n + 1
        assert.is_truthy(name:match("^postmta_") or name:match("^process_"), name)
      end
      assert.is_true(n >= 25)
      assert.equal(1, value(s, "postmta_messages", "postmta_messages_total", { tenant = "acme" }))
      assert.equal(1, value(s, "postmta_messages_delivered", "postmta_messages_delivered_total",
        { tenant = "acme", domain = "x.test" }))
      assert.equal(1, value(s, "postmta_delivery_latency_seconds", "postmta_delivery_latency_seconds_count",
        { tenant = "acme" }))
      H.stop_mta(mta)
    end)
  end)

  it("counts TLS handshakes in and out, failed ones, and DKIM signatures", function()
    local d = H.certs()
    H.with_sink({ "--tls", d .. "/self.pem", d .. "/self.key" }, function(sink)
      local keys = { ["client.test"] = { s1 = H.root .. "/spec/fixtures/dkim/ed25519.pem" } }
      local mta, port, hport = relay_mta(dir, sink.port, {
        accept = { tls = { cert = d .. "/mx.pem", key = d .. "/mx.key" } },
        setup = function(m) m:use(require("moonpost.dkim").sign { keys = keys }) end,
      })
      local before = scrape(hport)
      local function get(s, fam, labels) return value(s, "moonpost_" .. fam, "moonpost_" .. fam .. "_total", labels) end
      -- a message over STARTTLS, signed, relayed over STARTTLS
      local p = assert(H.connect(port))
      p:script([[
        S: 220
        C: EHLO client.test
        S: 250
        C: STARTTLS
        S: 220
      ]])
      assert(p:starttls("mx.test.example"))
      p:script([[
        C: EHLO client.test
        S: 250
        C: MAIL FROM:<a@client.test>
        S: 250
        C: RCPT TO:<b@x.test>
        S: 250
        C: DATA
        S: 354
      ]])
      p:send("From: a@client.test\r\nTo: b@x.test\r\nSubject: signed\r\n\r\nhello\r\n.\r\n")
      p:expect(250)
      p:cmd("QUIT")
      p:close()
      -- a client that says STARTTLS and then sends no TLS handshake
      local bad = assert(H.connect(port))
      bad:script([[
        S: 220
        C: EHLO client.test
        S: 250
        C: STARTTLS
        S: 220
      ]])
      bad:send("this is not a TLS ClientHello\r\n")
      assert.is_true(bad:closed(10))
      bad:close()
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 and mta.spool:count() == 0 end, 10))
      assert.equal("TLSv1.3", sink.messages()[1].tls)
      local s = scrape(hport)
      assert.equal(1, get(s, "tls_handshakes", { direction = "in" }) - get(before, "tls_handshakes", { direction = "in" }))
      assert.equal(1, get(s, "tls_handshake_failures", { direction = "in" })
        - get(before, "tls_handshake_failures", { direction = "in" }))
      assert.equal(1, get(s, "tls_handshakes", { direction = "out" }) - get(before, "tls_handshakes", { direction = "out" }))
      assert.equal(1, get(s, "dkim_signatures", { algorithm = "ed25519-sha256" })
        - get(before, "dkim_signatures", { algorithm = "ed25519-sha256" }))
      assert.equal(2, get(s, "connections", { direction = "in" }))
      H.stop_mta(mta)
    end)
  end)

  it("caps domains and tenants: real traffic to many domains keeps a bounded number of series", function()
    local N = 12
    H.with_sink(function(sink)
      local mta, port, hport = relay_mta(dir, sink.port, { metrics = { max_domains = 5 }, retry = { "1h" } })
      for i = 1, N do
        assert.equal(250, (H.send(port, { to = { "ok@d" .. i .. ".test", "r451-x@e" .. i .. ".test" } })))
      end
      assert.is_true(H.wait_for(function()
        return #sink.messages() == N and mta.queue.stats.deferred == N and mta.queue.running == 0
      end, 20))
      local s = scrape(hport)
      local delivered = matching(s, "moonpost_messages_delivered", "moonpost_messages_delivered_total")
      assert.is_true(#delivered <= 6, "delivered series: " .. #delivered)
      assert.equal(N, sum(s, "moonpost_messages_delivered", "moonpost_messages_delivered_total"))
      assert.is_true(value(s, "moonpost_messages_delivered", "moonpost_messages_delivered_total",
        { domain = "other" }) >= N - 5)
      local deferred = matching(s, "moonpost_messages_deferred", "moonpost_messages_deferred_total")
      assert.is_true(#deferred <= 6)
      assert.equal(N, sum(s, "moonpost_messages_deferred", "moonpost_messages_deferred_total"))
      -- the queue depth gauge: the deepest 5 domains and other, summing to the N queued messages
      local depth = matching(s, "moonpost_queue_depth", "moonpost_queue_depth")
      assert.is_true(#depth <= 6, "queue_depth series: " .. #depth)
      assert.equal(N, sum(s, "moonpost_queue_depth", "moonpost_queue_depth"))
      H.stop_mta(mta)
    end)
  end)

  it("setup() reports a bad option at the caller's line, naming the field", function()
    local metrics = require "moonpost.metrics"
    local line = debug.getinfo(1, "l").currentline
    local ok, err = pcall(metrics.setup, { prefix = "post-mta" })
    assert.is_false(ok)
    assert.equal("metrics_spec.lua:" .. (line + 1) .. ": metrics.setup: field 'prefix': expected a metric name "
      .. "([a-zA-Z_:][a-zA-Z0-9_:]*)", err:match("[^/]*$"))
    ok, err = pcall(metrics.setup, { buckets = { 1, 0.5 } })
    assert.is_false(ok)
    assert.matches("metrics.setup: field 'buckets': expected increasing numbers %(0.5 after 1%)$", err)
    ok, err = pcall(metrics.setup, { max_domains = "many" })
    assert.is_false(ok)
    assert.matches("metrics.setup: field 'max_domains'", err)
  end)

  it("10,000 distinct recipient domains and 1,000 tenants produce a bounded number of series", function()
    H.run(function()
      local mta = H.start_mta({}, nil, { http = "127.0.0.1:0" })
      local hport = mta:http_addresses()[1].port
      local c = mta.counters
      for i = 1, 10000 do
        local tenant, domain = "t" .. (i % 1000), "d" .. i .. ".test"
        c.delivered:inc(tenant, domain)
        c.deferred:inc(tenant, domain)
        c.bounced:inc(tenant, "invalid-recipient", "hard")
        c.latency:observe(i / 1000, tenant)
      end
      -- and 10,000 queues, set after the MTA's own collect function has run
      local depth = mta.metrics:get("queue_depth")
      mta.metrics:collect(function()
        for i = 1, 10000 do depth:set(1, "t" .. (i % 1000), "d" .. i .. ".test") end
      end)
      local s = scrape(hport)
      local function series(family, sample)
        return #matching(s, family, sample)
      end
      local delivered = series("moonpost_messages_delivered", "moonpost_messages_delivered_total")
      -- at most 101 tenants x 201 domains, and in fact far fewer: both are capped
      assert.is_true(delivered <= 101 * 201, delivered)
      assert.equal(10000, sum(s, "moonpost_messages_delivered", "moonpost_messages_delivered_total"))
      local tenants, domains = {}, {}
      for _, x in ipairs(matching(s, "moonpost_messages_delivered", "moonpost_messages_delivered_total")) do
        tenants[x[2].tenant] = true
        domains[x[2].domain] = true
      end
      local nt, nd = 0, 0
      for _ in pairs(tenants) do nt = nt + 1 end
      for _ in pairs(domains) do nd = nd + 1 end
      assert.is_true(nt <= 101, "tenants: " .. nt)
      assert.is_true(nd <= 201, "domains: " .. nd)
      assert.is_true(series("moonpost_messages_bounced", "moonpost_messages_bounced_total") <= 101)
      assert.is_true(series("moonpost_delivery_latency_seconds", "moonpost_delivery_latency_seconds_count") <= 101)
      assert.equal(10000, sum(s, "moonpost_delivery_latency_seconds", "moonpost_delivery_latency_seconds_count"))
      local depth_series = series("moonpost_queue_depth", "moonpost_queue_depth")
      assert.is_true(depth_series <= 101 * 201, depth_series)
      assert.equal(10000, sum(s, "moonpost_queue_depth", "moonpost_queue_depth"))
      -- the whole page stays small
      assert.is_true(s.lines < 25000, "lines: " .. s.lines)
      H.stop_mta(mta)
    end)
  end)
end)
