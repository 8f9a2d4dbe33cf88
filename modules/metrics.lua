-- moonpost.metrics: Prometheus metrics of an MTA, served on GET /metrics of
-- the HTTP listener (docs/metrics.md lists every family).
--
--   mta:use(require("moonpost.metrics").setup {
--     prefix = "moonpost",           -- families are <prefix>_<name>: "postmta" for dashboards built for it
--     max_tenants = 100,             -- distinct tenant values per family; the rest is tenant="other"
--     max_domains = 200,             -- the same for recipient domains
--     buckets = { 0.1, 1, 10, 60, 600, 3600 }, -- delivery_latency_seconds, in seconds
--   })
--
-- Every MTA has its metrics whether or not the policy uses this block
-- (moonpost.new calls install()); the block only changes the settings, and
-- must be used before the MTA starts. Counts that the runtime keeps anyway
-- (the spool's, the resolver's, the queue's depths, the outbound
-- connections') are read when /metrics is scraped, not on every change.
local metrics = require "moonpost.runtime.metrics"
local config = require "moonpost.runtime.config"
local client = require "moonpost.runtime.client"
local dns = require "moonpost.runtime.dns"
local uv = require "luv"
local gc = require "moonpost.runtime.gc"

local ipairs, pairs, collectgarbage, loaded = ipairs, pairs, collectgarbage, package.loaded

local _M = { _VERSION = "0.1" }

_M.PATH = "/metrics"
_M.CONTENT_TYPE = metrics.CONTENT_TYPE
_M.DEFAULTS = { prefix = "moonpost", max_tenants = 100, max_domains = 200 }

-- when the process started (this module loads with moonpost, at launch)
local started = (function()
  local sec, usec = uv.gettimeofday()
  return sec + usec / 1e6
end)()

local function tv(t) return t and (t.sec + t.usec / 1e6) or 0 end

local NO_DKIM = { signatures = { ["rsa-sha256"] = 0, ["ed25519-sha256"] = 0 }, failures = 0 }

-- install(mta): the MTA's registry (mta.metrics), the families the runtime
-- updates itself (mta.counters), the collect function for the rest, and the
-- GET /metrics route when the MTA has an HTTP listener. predecessor: the MTA
-- a reload replaces; its counters and histograms carry on in this registry.
function _M.install(mta, predecessor)
  local D = _M.DEFAULTS
  local reg = metrics.new { prefix = D.prefix, caps = { tenant = D.max_tenants, domain = D.max_domains },
    inherit = predecessor and predecessor.metrics }
  mta.metrics = reg
  local c = {}
  mta.counters = c

  -- messages
  c.received = reg:counter("messages_total",
    "Messages received and queued: 250 at the end of SMTP data (after the spool sync), or injected over HTTP",
    { "tenant", "listener" })
  c.delivered = reg:counter("messages_delivered_total",
    "Recipients delivered: the next hop answered 250 (or a local transport stored the message)",
    { "tenant", "domain" })
  c.deferred = reg:counter("messages_deferred_total",
    "Delivery attempts of a recipient that failed temporarily; the recipient is retried", { "tenant", "domain" })
  c.bounced = reg:counter("messages_bounced_total",
    "Recipients bounced, by bounce class and kind (hard: permanent, soft: temporary or expired)",
    { "tenant", "class", "kind" })
  c.suppressed = reg:counter("messages_suppressed_total",
    "Recipients finished without an attempt by a suppression list", { "tenant" })
  c.latency = reg:histogram("delivery_latency_seconds",
    "Seconds from the durable 250 to the remote 250, per delivered recipient", { "tenant" })
  local attempts = reg:counter("delivery_attempts_total", "Delivery attempts (one per message and attempt)")
  local depth = reg:gauge("queue_depth",
    "Messages queued for delivery, per tenant and recipient domain", { "tenant", "domain" })

  -- connections and TLS
  local conns = reg:counter("connections_total", "SMTP connections accepted (in) and made (out)",
    { "direction" })
  c.connections_in = conns:child("in")
  local open = reg:gauge("connections_open", "SMTP connections open now", { "direction" })
  local parked = reg:gauge("smtp_sessions_parked",
    "SMTP sessions in that are idle and parked, holding no coroutine")
  local tls = reg:counter("tls_handshakes_total", "TLS handshakes completed", { "direction" })
  c.tls_in = tls:child("in")
  local tls_failed = reg:counter("tls_handshake_failures_total", "TLS handshakes that failed", { "direction" })
  c.tls_in_failed = tls_failed:child("in")

  -- the spool
  local spool_messages = reg:gauge("spool_messages", "Messages in the spool not yet finished")
  local spool_bytes = reg:gauge("spool_bytes", "Size of the spool's segment files")
  local spool_segments = reg:gauge("spool_segments", "Segment files in the spool")
  local spool_written = reg:counter("spool_written_bytes_total", "Bytes of records written to the spool")
  local spool_batches = reg:counter("spool_fsync_batches_total",
    "Group commits: syncs that made a batch of stored messages durable")
  local spool_fsyncs = reg:counter("spool_fsyncs_total", "fdatasync and fsync calls of the spool")
  local spool_compactions = reg:counter("spool_compactions_total", "Spool segments compacted")

  -- DKIM and DNS (the process's signer and resolver)
  local dkim_sigs = reg:counter("dkim_signatures_total", "DKIM signatures made, by algorithm", { "algorithm" })
  local dkim_failures = reg:counter("dkim_failures_total", "Messages that could not be DKIM-signed")
  local dns_queries = reg:counter("dns_queries_total", "DNS lookups asked of the resolver (cached or not)")
  local dns_hits = reg:counter("dns_cache_hits_total", "DNS lookups answered from the cache")
  local dns_sent = reg:counter("dns_queries_sent_total", "DNS queries sent to name servers")

  -- the process
  local lua_memory = reg:gauge("lua_memory_bytes", "Memory used by Lua objects (collectgarbage \"count\")")
  local gc_cycles = reg:counter("lua_gc_cycles_total", "Lua garbage collection cycles ended")
  local gc_pause = reg:gauge("lua_gc_pause_percent",
    "The Lua collector's pause now: gc_pause, or less where gc_headroom holds the heap")
  reg:gauge("build_info", "Moonpost's version", { "version" }):child(require("moonpost")._VERSION):set(1)
  reg:gauge("process_start_time_seconds", "Start time of the process since the Unix epoch in seconds",
    nil, { raw = true }):set(started)
  local rss = reg:gauge("process_resident_memory_bytes", "Resident memory size in bytes", nil, { raw = true })
  local cpu = reg:counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds",
    nil, { raw = true })

  reg:collect(function()
    local cs = client.stats
    conns:set(cs.connections, "out")
    open:set(mta:sessions(), "in")
    parked:set(mta:parked_sessions())
    open:set(cs.open, "out")
    tls:set(cs.tls, "out")
    tls_failed:set(cs.tls_failed, "out")

    depth:clear()
    local q = mta.queue
    if q then
      for _, e in ipairs(q:summary()) do
        -- e.tenant is nil for recovered messages whose envelope is not read yet
        depth:set(e.depth, e.tenant or "", e.domain or "unread")
      end
      attempts:set(q.stats.attempts)
    end

    local sp = mta.spool
    if sp then
      local st, bytes = sp.stats, 0
      for _, seg in pairs(sp.segs) do bytes = bytes + seg.size end
      spool_messages:set(sp.nlive)
      spool_bytes:set(bytes)
      spool_segments:set(#sp.order)
      spool_written:set(st.bytes)
      spool_batches:set(st.batches)
      spool_fsyncs:set(st.fsyncs)
      spool_compactions:set(st.compactions)
    else
      spool_messages:set(0)
      spool_bytes:set(0)
      spool_segments:set(0)
    end

    -- the signer's counts, when a block loaded it (a relay without DKIM
    -- does not load the signer and its libraries for the metrics' sake)
    local rdkim = loaded["moonpost.runtime.dkim"]
    local ds = rdkim and rdkim.stats or NO_DKIM
    for alg, n in pairs(ds.signatures) do dkim_sigs:set(n, alg) end
    dkim_failures:set(ds.failures)
    local dt = dns.totals
    dns_queries:set(dt.queries)
    dns_hits:set(dt.hits)
    dns_sent:set(dt.sent)

    lua_memory:set(collectgarbage("count") * 1024)
    gc_cycles:set(gc.cycles())
    gc_pause:set(gc.pause())
    rss:set(uv.resident_set_memory() or 0)
    local ru = uv.getrusage()
    if ru then cpu:set(tv(ru.utime) + tv(ru.stime)) end
  end)

  if mta.http_route then
    mta:http_route("GET", _M.PATH, reg:handler(), { open = true })
  end
  return reg
end

-- render(mta) -> the exposition text of the MTA's metrics
function _M.render(mta)
  return mta.metrics:render()
end

-- ---- the block ------------------------------------------------------------------------------

local SCHEMA = {
  prefix = { type = "string", default = _M.DEFAULTS.prefix,
    check = function(v)
      return v == "" or metrics.valid_name(v), "expected a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
    end },
  max_tenants = { type = "nonneg", default = _M.DEFAULTS.max_tenants },
  max_domains = { type = "nonneg", default = _M.DEFAULTS.max_domains },
  buckets = { type = "table" },
  half_life = { type = "duration", default = metrics.DEFAULT_HALF_LIFE,
    check = function(v) return v > 0, "must be > 0" end },
}

-- setup(opts) -> block: the settings of the MTA's metrics (see the top).
function _M.setup(opts)
  local o = config.check("metrics.setup", opts, SCHEMA)
  if o.buckets then
    local ok, b = pcall(metrics.check_buckets, o.buckets, "metrics.setup: field 'buckets'")
    if not ok then config.raise((tostring(b):gsub("^.-(metrics%.setup)", "%1"))) end
    o.buckets = b
  end
  local block = { name = "metrics", opts = o }
  function block.attach(_, mta)
    if mta.started then config.raise("metrics.setup: use() it before the MTA starts") end
    mta.metrics:configure { prefix = o.prefix, buckets = o.buckets, half_life = o.half_life,
      caps = { tenant = o.max_tenants, domain = o.max_domains } }
  end
  return block
end

return _M
