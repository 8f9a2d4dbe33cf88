-- moonpost: the policy API.
--
--   local moonpost = require "moonpost"
--   local mta = moonpost.new { hostname = "mta1.example.net" }
--   mta:use(require("moonpost.accept").smtp { listen = moonpost.env.listen })
--   mta:on("smtp_server_rcpt_to", function(txn, rcpt) ... end)
--   mta:run()
--
-- Verdicts: moonpost.reject(code, enhanced, text), moonpost.tempfail(...),
-- moonpost.accept(...). See docs/events.md for every event.
local uv = require "luv"
local hooks = require "moonpost.runtime.hooks"
local config = require "moonpost.runtime.config"
local log = require "moonpost.runtime.log"
local sched = require "moonpost.runtime.sched"
local server = require "moonpost.runtime.server"
local env = require "moonpost.runtime.env"
local spool = require "moonpost.runtime.spool"
local queue = require "moonpost.runtime.queue"
local dns = require "moonpost.runtime.dns"
local tls = require "moonpost.runtime.tls"
local http = require "moonpost.runtime.http"
local bounce = require "moonpost.bounce"
local tenants = require "moonpost.runtime.tenants"
local policy = require "moonpost.runtime.policy"
local reload = require "moonpost.runtime.reload"
local metrics = require "moonpost.metrics"
local workers = require "moonpost.runtime.workers"
local proc = require "moonpost.core.proc"
local gc = require "moonpost.runtime.gc"

local _M = { _VERSION = "0.1.0" }

_M.reject = hooks.reject
_M.tempfail = hooks.tempfail
_M.accept = hooks.accept
_M.is_verdict = hooks.is_verdict
_M.env = env
_M.log = log
_M.sleep = sched.sleep
_M.spawn = sched.spawn

-- DNS for hooks and blocks: moonpost.dns.query(name, type), moonpost.dns.mx(domain),
-- moonpost.dns.to_ascii(domain)
_M.dns = {
  query = function(name, rtype) return dns.default():query(name, rtype) end,
  mx = function(domain, opts) return dns.default():mx_hosts(domain, opts) end,
  to_ascii = dns.to_ascii,
}

-- Set by `moonpost check`: policies load and are validated, nothing starts.
_M.check_mode = false

-- True while a reload runs the policy again (SIGHUP, reload_policy()): the
-- MTA it builds is handed the running one's spool, queue and sockets;
-- start() and run() start nothing.
_M.reloading = false
_M.reload_from = nil -- the running MTA while a reload builds its successor

-- Every event a policy can hook (docs/events.md has one section each).
_M.EVENTS = {
  smtp_server_connect = true,
  smtp_server_ehlo = true,
  smtp_server_mail_from = true,
  smtp_server_rcpt_to = true,
  smtp_server_data = true,
  smtp_server_message_received = true,
  smtp_server_disconnect = true,
  smtp_server_tls = true,
  reloaded = true,
  delivery_delivered = true,
  delivery_deferred = true,
  delivery_bounced = true,
  delivery_suppressed = true,
  -- informational, for the event log (docs/eventlog.md)
  smtp_server_message_queued = true,
  smtp_server_rejected = true,
  delivery_dsn = true,
}

-- Every MTA the policy made (the launcher runs one the policy did not).
local instances = {}
_M.instances = instances

local MTA = {}
local mta_mt = { __index = MTA }

local NEW_SCHEMA = {
  hostname = { type = "string", default = function() return env.hostname end },
  log_level = { type = "enum", values = { "error", "warn", "info", "debug" } },
  log_format = { type = "enum", values = { "text", "json" } },
  stop_grace = { type = "duration", default = 10 },
  spool = { type = "any" },
  queue = { type = "table" },
  dns = { type = "any" },
  tenants = { type = "table" },   -- name -> settings (runtime/tenants.lua, docs/tenants.md)
  http = { type = "any" },        -- "host:port" of the HTTP listener (API, /metrics, health), or nil
  api_token = { type = "string" },
  http_max_body = { type = "size", default = "10M" },
  http_max_connections = { type = "posint", default = 256 }, -- per HTTP listener
  -- processes (runtime/workers.lua, docs/cli.md#workers); each holds a spool partition and a port
  workers = { type = "posint", default = 1, check = function(v) return v <= 256, "must be at most 256" end },
  -- a worker whose loop has not run for this long is killed and started
  -- again by the supervisor (0: never); docs/cli.md#workers
  watchdog = { type = "duration", default = 30 },
  -- the Lua collector's pause (collectgarbage "setpause"): a cycle starts when
  -- the heap is this % of what the last one kept. Lua's 200 made the relay
  -- spend ~15% more CPU time per message than 400, which costs about twice
  -- the live heap in memory (docs/api.md).
  gc_pause = { type = "posint", default = 400,
    check = function(v) return v >= gc.MIN_PAUSE and v <= 1000, "must be between " .. gc.MIN_PAUSE .. " and 1000" end },
  -- the most the Lua heap grows past what a collection cycle left alive
  -- before the next starts, whatever gc_pause allows (runtime/gc.lua): a
  -- large queue's heap is not let grow to four times itself; 0: gc_pause alone
  gc_headroom = { type = "size", default = 64 * 1048576 },
}

local DNS_SCHEMA = {
  servers = { type = "list" },
  timeout = { type = "duration", default = 2, check = function(v) return v > 0, "must be > 0" end },
  tries = { type = "posint", default = 2 },
}

-- dns = "host:port[,host:port]" | { servers = ..., timeout = ..., tries = ... } | nil (resolv.conf)
local function check_dns(v)
  if v == nil or v == false then return nil end
  if type(v) == "string" then v = { servers = v } end
  if type(v) ~= "table" then
    config.raise("moonpost.new: field 'dns': expected host:port, a table or nil, got " .. type(v))
  end
  local o = config.check("moonpost.new: dns", v, DNS_SCHEMA)
  if o.servers then
    local list = {}
    for _, s in ipairs(o.servers) do
      for item in s:gmatch("[^,%s]+") do
        local host, port = config.parse_address(item)
        if not host then config.raise("moonpost.new: dns: field 'servers': " .. port) end
        list[#list + 1] = (host:find(":", 1, true) and ("[" .. host .. "]") or host) .. ":" .. port
      end
    end
    o.servers = table.concat(list, ",")
  end
  return o
end

local SPOOL_SCHEMA = {
  dir = { type = "string", required = true },
  segment_size = { type = "size", default = 64 * 1048576,
    check = function(v) return v >= 4096, "must be at least 4096" end },
  min_free = { type = "size", default = 64 * 1048576 },
  compact_ratio = { type = "number", default = 0.5,
    check = function(v) return v >= 0 and v <= 1, "must be between 0 and 1" end },
  -- (0 would check once and never again: a full disk would refuse mail for good)
  check_interval = { type = "duration", default = 2, check = function(v) return v > 0, "must be > 0" end },
  compact_delay = { type = "duration", default = 60 },
  cache_bytes = { type = "size", default = 64 * 1048576 },
  preallocate = { type = "boolean", default = true },
}

local QUEUE_SCHEMA = {
  -- above a destination's max_connections (route.smtp, 20), the attempts
  -- that wait keep its connections busy: docs/route.md, The transaction
  concurrency = { type = "posint", default = 100 },
  -- attempts at once for one tenant@domain: a slow destination keeps the
  -- rest of the workers for the others (docs/spool.md, Attempts)
  per_destination = { type = "posint", default = 40 },
  retry = { type = "table", default = function() return { "5m", "10m", "20m", "40m", "1h" } end },
  max_age = { type = "duration", default = "5d" },
  delay_warning = { type = "duration" },
  domains = { type = "table" },
}

local DOMAIN_QUEUE_SCHEMA = {
  retry = { type = "table" },
  max_age = { type = "duration" },
}

local function check_retry(list, where)
  local r = {}
  for i, d in ipairs(list) do
    r[i] = config.duration(d)
    if not r[i] then
      config.raise(string.format("%s: field 'retry' item %d: expected a duration, got %s", where, i, tostring(d)))
    end
  end
  if #r == 0 then config.raise(where .. ": field 'retry': needs at least one interval") end
  return r
end

-- MOONPOST_SPOOL_FAULT=compaction_pause=<seconds>: a pause in the middle of a
-- compaction, so that the crash tests can kill the process right there.
local function spool_faults()
  local f = {}
  local s = env.get("MOONPOST_SPOOL_FAULT")
  if s then
    for k, v in s:gmatch("([%w_]+)=([%d%.]+)") do f[k] = tonumber(v) end
  end
  return f
end

local function check_spool(v)
  if v == nil or v == false then return nil end
  if type(v) == "string" then v = { dir = v } end
  if type(v) ~= "table" then
    config.raise("moonpost.new: field 'spool': expected a directory, a table or false, got " .. type(v))
  end
  return config.check("moonpost.new: spool", v, SPOOL_SCHEMA)
end

local function check_queue(v)
  local q = config.check("moonpost.new: queue", v, QUEUE_SCHEMA)
  q.retry = check_retry(q.retry, "moonpost.new: queue")
  local domains = {}
  for d, dv in pairs(q.domains or {}) do
    local where = "moonpost.new: queue: domains[" .. tostring(d) .. "]"
    if type(d) ~= "string" then config.raise("moonpost.new: queue: field 'domains': keys must be domains") end
    -- in A-labels, as the queue looks them up; a name, not a pattern
    local a = dns.to_ascii(d)
    a = a and a:gsub("%.$", "")
    if not dns.is_name(a) then
      config.raise(string.format("moonpost.new: queue: field 'domains': %q is not a domain name "
        .. "(a whole name such as \"example.org\"; no wildcards)", d))
    end
    local o = config.check(where, dv, DOMAIN_QUEUE_SCHEMA)
    domains[a] = { retry = o.retry and check_retry(o.retry, where), max_age = o.max_age }
  end
  q.domains = domains
  return q
end

-- http = "host:port" | { "host:port", ... } | false/nil (no listener)
local function check_http(v)
  if v == nil or v == false then return nil end
  local list = type(v) == "string" and { v } or v
  if type(list) ~= "table" then
    config.raise("moonpost.new: field 'http': expected host:port, a list of them, or false, got " .. type(v))
  end
  local out = {}
  for i, a in ipairs(list) do
    local host, port = config.parse_address(a)
    if not host then config.raise(string.format("moonpost.new: field 'http' item %d: %s", i, port)) end
    out[i] = { host = host, port = port }
  end
  return out
end

function _M.new(opts)
  opts = config.check("moonpost.new", opts, NEW_SCHEMA)
  opts.http = check_http(opts.http)
  opts.spool = check_spool(opts.spool)
  opts.queue = check_queue(opts.queue)
  opts.dns = check_dns(opts.dns)
  opts.tenants = tenants.check(opts.tenants)
  local wi = workers.index
  if wi then
    -- a worker: its own spool partition and HTTP port (docs/cli.md#workers)
    if opts.spool then opts.spool.dir = opts.spool.dir:gsub("/+$", "") .. "/w" .. wi end
    for _, a in ipairs(opts.http or {}) do
      if a.port ~= 0 then a.port = a.port + wi end
    end
  end
  -- a reload applies them once the new policy has taken over
  if not _M.reloading then
    if opts.log_level then log.set_level(opts.log_level) end
    if opts.log_format then log.set_format(opts.log_format) end
  end
  gc.configure(opts.gc_pause, opts.gc_headroom)
  local mta = setmetatable({
    hostname = opts.hostname,
    opts = opts,
    bus = hooks.new(_M.EVENTS),
    tenants = tenants.new(opts.tenants),
    listen_specs = {},
    listeners = {},
    started = false,
    stopping = false,
  }, mta_mt)
  instances[#instances + 1] = mta
  metrics.install(mta, _M.reload_from) -- mta.metrics, GET /metrics (moonpost.metrics changes its settings)
  -- the operator's API under /api/v1 (moonpost.admin, docs/http-api.md)
  if opts.http then require("moonpost.admin").install(mta) end
  return mta
end

-- on(event, fn): append fn to the event's chain.
function MTA:on(event, fn)
  self.bus:on(event, fn)
  return self
end

-- use(block): a block is a table with an `on` table of handlers
-- ({ event = fn | { fn, ... } }) and/or an attach(mta) function. A block
-- that holds files opens them in start(block, mta) -> true | nil, err
-- (run by mta:start(), before the spool and the listeners) and closes them
-- in stop(block, mta) (once the MTA has stopped); moonpost.suppress does.
function MTA:use(block)
  if type(block) ~= "table" then
    config.raise("use(): expected a block (a table from a module's constructor), got " .. type(block))
  end
  if block.attach == nil and block.on == nil then
    -- mta:use(require("moonpost.accept")): the module, not its block
    config.raise("use(): expected a block with 'on' or 'attach' (a table from a module's constructor, such as "
      .. "require(\"moonpost.accept\").smtp { ... }), got a table with neither")
  end
  if block.attach ~= nil and type(block.attach) ~= "function" then
    config.raise("use(): field 'attach': expected a function, got " .. type(block.attach))
  end
  if block.attach then block:attach(self) end
  if block.on ~= nil then
    if type(block.on) ~= "table" then
      config.raise("use(): field 'on': expected a table of event = handler, got " .. type(block.on))
    end
    for event, fns in pairs(block.on) do
      local where = "use(): field 'on." .. tostring(event) .. "'"
      if type(fns) == "function" then
        fns = { fns }
      elseif type(fns) ~= "table" then
        config.raise(where .. ": expected a function or a list of functions, got " .. type(fns))
      end
      for i, fn in ipairs(fns) do
        if type(fn) ~= "function" then
          config.raise(string.format("%s item %d: expected a function, got %s", where, i, type(fn)))
        end
      end
    end
  end
  self.blocks = self.blocks or {}
  self.blocks[#self.blocks + 1] = block
  if block.on then
    for event, fns in pairs(block.on) do
      if type(fns) == "function" then fns = { fns } end
      for _, fn in ipairs(fns) do self.bus:on(event, fn) end
    end
  end
  return self
end

-- Used by blocks that must see each message last, after every
-- smtp_server_message_received handler has let it through and before it is
-- stored (moonpost.dkim signs here). fn(txn, msg) may wait; it returns nil
-- to go on, or a verdict (a tempfail or reject ends the transaction with it).
function MTA:add_message_step(fn)
  self.message_steps = self.message_steps or {}
  self.message_steps[#self.message_steps + 1] = fn
end

-- Used by moonpost.accept: remember a listener to open at start().
-- The same address twice would fail at start (EADDRINUSE): refused here,
-- at the policy's line. Port 0 (any free port) may repeat.
function MTA:add_listener(spec)
  if spec.port ~= 0 then
    local function show(a) return (a.host:find(":", 1, true) and ("[" .. a.host .. "]") or a.host) .. ":" .. a.port end
    local function same(a) return a.port == spec.port and a.host == spec.host end
    for _, other in ipairs(self.listen_specs) do
      if same(other) then
        config.raise(string.format("accept.smtp: field 'listen': %s is already the address of a listener", show(spec)))
      end
    end
    for _, a in ipairs(self.opts.http or {}) do
      if same(a) then
        config.raise(string.format("accept.smtp: field 'listen': %s is the address of the HTTP listener "
          .. "(moonpost.new { http = ... })", show(spec)))
      end
    end
  end
  self.listen_specs[#self.listen_specs + 1] = spec
end

-- Used by delivery blocks (moonpost.maildir, moonpost.route): a transport
-- that delivers spooled mail. t = { name, deliver = fn(env, body, rcpts),
-- domains = list or nil (nil: every domain no other transport claims),
-- close = fn or nil }. See runtime/queue.lua for the contract.
function MTA:add_transport(t)
  self.transports = self.transports or {}
  for _, other in ipairs(self.transports) do
    for _, d in ipairs(t.domains or {}) do
      for _, e in ipairs(other.domains or {}) do
        if d:lower() == e:lower() then
          config.raise(string.format("%s and %s both claim the domain %s", other.name, t.name, d))
        end
      end
    end
  end
  if not t.domains then
    for _, other in ipairs(self.transports) do
      if not other.domains then
        config.raise(string.format("%s and %s both want every domain: give one of them 'domains'",
          other.name, t.name))
      end
    end
  end
  self.transports[#self.transports + 1] = t
end

-- add_delivery_filter(fn): fn(env, rcpt) runs before every delivery attempt
-- of every recipient (env.tenant, env.from, rcpt.address, rcpt.domain);
-- nil lets it go on, a result ends the recipient without an attempt:
-- { status = "suppressed", text = ... } finishes it silently (logged, the
-- delivery_suppressed event, no DSN), { status = "bounced", code, enhanced,
-- text } bounces it. moonpost.suppress uses it for queue-time checks.
function MTA:add_delivery_filter(fn)
  self.delivery_filters = self.delivery_filters or {}
  self.delivery_filters[#self.delivery_filters + 1] = fn
  if self.queue then self.queue:add_filter(fn) end
end

-- event_log(record): a record (a table with a string `type`, such as
-- "AdminAction") for every moonpost.eventlog block of this MTA; nothing
-- without one. `time` is added when missing (docs/eventlog.md).
function MTA:event_log(rec)
  local logs = self.event_logs
  if not logs then
    if type(rec) ~= "table" or type(rec.type) ~= "string" then
      error("event_log(record): record must be a table with a string field 'type'", 2)
    end
    return
  end
  for _, l in ipairs(logs) do l:record(rec, 2) end
end

-- tenant_depth(tenant) -> messages of that tenant queued for delivery
function MTA:tenant_depth(tenant)
  return self.queue and self.queue:tenant_depth(tenant) or 0
end

-- set_transport(fn): a transport for every domain.
function MTA:set_transport(fn)
  self:add_transport({ name = "transport", deliver = fn })
end

function MTA:has_spool()
  return self.opts.spool ~= nil
end

-- start(): recover the spool, start delivering, open the listeners, and
-- return (the loop runs elsewhere).
-- Mail queued in a part of the spool this policy does not deliver (after a
-- change of workers) waits for ever unless someone is told.
local function warn_stranded(so, n)
  if not so then return end
  for _, p in ipairs(spool.stranded(so.dir, n)) do
    log.warn("spool: %s holds %d queued messages that this policy does not deliver (workers = %d): run it with "
      .. "the number of workers that queued them, or serve that directory alone (docs/spool.md#partitions)",
      p.dir, p.messages, n)
  end
end

function MTA:start()
  if self.started then return true end
  if _M.check_mode or _M.reloading then return true end
  -- the supervisor of worker processes serves nothing itself: its workers
  -- start their MTAs (runtime/workers.lua)
  if self.opts.workers > 1 and not workers.index then
    warn_stranded(self.opts.spool, self.opts.workers)
    return true
  end
  -- glibc's heap top kept, not given back at every free (core/lsmtp.c)
  require("moonpost.core.smtp").tune_malloc()
  self.stopping, self.stopped, self.stop_waiters = false, false, nil
  dns.configure(self.opts.dns)
  local bok, berr = self:start_blocks()
  if not bok then return nil, berr end
  local so = self.opts.spool
  if so then
    local sp, err = spool.open({ dir = so.dir, segment_size = so.segment_size, min_free = so.min_free,
      compact_ratio = so.compact_ratio, check_interval = so.check_interval, compact_delay = so.compact_delay,
      cache_bytes = so.cache_bytes, preallocate = so.preallocate,
      fault = spool_faults() })
    if not sp then
      self:stop_blocks()
      return nil, err
    end
    self.spool = sp
    if not workers.index then warn_stranded(so, 1) end
    local q = queue.new(self, sp, self:queue_options())
    self.queue = q
    for _, fn in ipairs(self.delivery_filters or {}) do q:add_filter(fn) end
    if self.transports then
      q:set_transports(self.transports)
    else
      sp.cache_bytes = 0 -- nothing will deliver: keep no bodies in memory
    end
    q:recover()
    sp.on_stored = function(m, envt) q:stored(m, envt) end
    q:start()
  else
    log.warn("no spool configured: accepted messages are only handed to smtp_server_message_received")
  end
  for _, spec in ipairs(self.listen_specs) do
    local l, err = server.listen(self, spec)
    if not l then
      for _, open in ipairs(self.listeners) do open:close() end
      self.listeners = {}
      self:close_spool()
      self:stop_blocks()
      return nil, err
    end
    self.listeners[#self.listeners + 1] = l
    log.info("listening smtp %s", l.name)
  end
  local hok, herr = self:start_http()
  if not hok then
    for _, open in ipairs(self.listeners) do open:close() end
    self.listeners = {}
    self:close_spool()
    self:stop_blocks()
    return nil, herr
  end
  self.started = true
  _M.current_mta = self
  return true
end

-- The delivery queue's options: the policy's, with its bounce classes (its
-- moonpost.bounce block, else the shipped rules). A reload hands the queue
-- the new policy's.
function MTA:queue_options()
  return setmetatable({
    classify = function(res) return (self.classify or bounce.classify)(res) end,
    describe_class = bounce.describe,
  }, { __index = self.opts.queue })
end

-- ---- the HTTP listener: API, /metrics, health ---------------------------------

-- http_route(method, path, handler [, opts]): an endpoint on the HTTP
-- listener (runtime/http.lua has the handler contract; path segments
-- ":name" are parameters). opts.open: no bearer token needed (metrics,
-- health). Blocks add theirs at use() or attach().
function MTA:http_route(method, path, handler, opts)
  self.http_router = self.http_router or http.router()
  self.http_router:add(method, path, handler, opts)
end

-- http_addresses() -> { { host, port, name } } of the open HTTP listeners
function MTA:http_addresses()
  local out = {}
  for i, h in ipairs(self.http_servers or {}) do out[i] = { host = h.host, port = h.port, name = h.name } end
  return out
end

-- ready() -> true | false, why: the spool is recovered and every listener is open
function MTA:ready()
  if self.stopping then return false, "stopping" end
  if not self.started then return false, "starting" end
  if self.opts.spool and not self.spool then return false, "the spool is not open" end
  return true
end

function MTA:start_http()
  self.http_servers = {}
  if not self.opts.http then return true end
  self:http_setup()
  for _, a in ipairs(self.opts.http) do
    local srv, err = self:http_listen(a)
    if not srv then
      for _, h in ipairs(self.http_servers) do h:close() end
      self.http_servers = {}
      return nil, err
    end
    self.http_servers[#self.http_servers + 1] = srv
  end
  return true
end

-- The router with the health endpoints (a reload makes the new policy's
-- before it takes the sockets over).
function MTA:http_setup()
  self.http_router = self.http_router or http.router()
  if not self.http_health then
    self.http_health = true
    self:http_route("GET", "/healthz", function() return 200, { status = "alive" } end, { open = true })
    self:http_route("GET", "/readyz", function()
      -- start() opens this listener last: once it answers, recovery is done
      -- and the SMTP listeners are open, unless the MTA is stopping
      local ok, why = self:ready()
      if ok then return 200, { status = "ready" } end
      return 503, { status = "not ready", reason = why }
    end, { open = true })
  end
end

-- http_listen({ host, port }) -> server | nil, err: one HTTP listener.
function MTA:http_listen(a)
  local srv, err = http.listen({ host = a.host, port = a.port, router = self.http_router,
    token = self.opts.api_token, max_body = self.opts.http_max_body, max_connections = self.opts.http_max_connections })
  if not srv then return nil, err end
  log.info("listening http %s%s", srv.name, self.opts.api_token and "" or " (API for loopback clients only)")
  return srv
end

function MTA:stop_http()
  for _, h in ipairs(self.http_servers or {}) do h:close() end
  self.http_servers = {}
end

-- queues() -> { { key, tenant, domain, depth, oldest, last_error, last_error_at, active, set_aside } }:
-- the scheduled queues (tenant@domain), read from counters, not messages.
function MTA:queues()
  return self.queue and self.queue:summary() or {}
end

-- addresses() -> { { host, port, name }, ... } of the open listeners.
function MTA:addresses()
  local out = {}
  for i, l in ipairs(self.listeners) do
    out[i] = { host = l.address, port = l.port, name = l.name }
  end
  return out
end

-- sessions() -> SMTP sessions in progress, including those that began
-- under a policy this MTA replaced (a reload) and have not ended.
function MTA:sessions()
  local n = 0
  for _, l in ipairs(self.listeners) do n = n + l.active end
  return n + reload.sessions(self)
end

-- parked_sessions() -> the sessions that are idle and parked
-- (docs/accept.md#idle-sessions), including those that began under a
-- policy this MTA replaced
function MTA:parked_sessions()
  local n = 0
  for _, l in ipairs(self.listeners) do n = n + l.parked end
  return n + reload.parked_sessions(self)
end

-- stop([grace]): stop accepting; sessions get `grace` seconds to finish,
-- then are closed. Calls done() when nothing is left.
function MTA:stop(grace, done)
  if self.retired then
    -- a reload replaced it: the MTA that took over is the one to stop
    if done then done() end
    return
  end
  if self.stopping then
    -- already stopping: call done when that finishes
    if done then
      if self.stopped then done() else self.stop_waiters[#self.stop_waiters + 1] = done end
    end
    return
  end
  self.stopping = true
  self.stop_waiters = { done }
  grace = grace or self.opts.stop_grace
  -- no new connections; sessions between transactions get 421 now, the
  -- others when their transaction is over
  for _, l in ipairs(self.listeners) do
    l:close()
    l:drain()
  end
  reload.drain(self)
  if self.queue then self.queue:stop() end
  local function closed()
    self:close_spool()
    self:stop_blocks()
    reload.retire_all(self)
    if _M.current_mta == self then _M.current_mta = nil end
    self.stopped = true
    for _, fn in ipairs(self.stop_waiters) do fn() end
  end
  local function finish()
    for _, l in ipairs(self.listeners) do l:drop_sessions() end
    self.listeners = {}
    reload.drop(self)
    self:stop_http()
    self.started = false
    local sp = self.spool
    if not sp then return closed() end
    -- the outcomes of the last deliveries to disk before the files close
    sched.spawn_named("spool flush", function(err)
      log.error("stop: spool sync: %s", tostring(err))
      closed()
    end, function()
      local ok, err = sp:sync()
      if not ok then log.error("stop: spool sync: %s", tostring(err)) end
      closed()
    end)
  end
  local function busy()
    return self:sessions() > 0 or (self.queue and self.queue.running > 0)
  end
  if not busy() or grace <= 0 then return finish() end
  -- Sessions finish their transactions and deliveries in progress end
  -- (their outcome is recorded), within the grace period.
  local t = uv.new_timer()
  local waited = 0
  t:start(50, 50, sched.callback(function()
    waited = waited + 0.05
    if not busy() or waited >= grace then
      t:close()
      finish()
    end
  end, "stop"))
end

-- The blocks' start() in the order they were used; a failure stops the
-- ones already started and names the block.
function MTA:start_blocks()
  local started = {}
  for _, b in ipairs(self.blocks or {}) do
    if b.start then
      local ok, err = b.start(b, self)
      if not ok then
        for i = #started, 1, -1 do
          if started[i].stop then pcall(started[i].stop, started[i], self) end
        end
        return nil, (b.name or "block") .. ": " .. tostring(err)
      end
      started[#started + 1] = b
    end
  end
  self.blocks_started = started
  return true
end

-- stop() of the started blocks, in reverse order.
function MTA:stop_blocks()
  local started = self.blocks_started or {}
  self.blocks_started = nil
  for i = #started, 1, -1 do
    local b = started[i]
    if b.stop then
      local ok, err = pcall(b.stop, b, self)
      if not ok then log.error("%s: stop: %s", b.name or "block", tostring(err)) end
    end
  end
end

function MTA:close_spool()
  if self.queue then
    self.queue:stop()
    local l = self.queue:latency_stats()
    if l.n > 0 then
      log.info("queue: %d delivered, %d deferred, %d bounced; 250 to first attempt: p50 %.2f ms, p99 %.2f ms, "
        .. "max %.2f ms (%d messages)", self.queue.stats.delivered, self.queue.stats.deferred,
        self.queue.stats.bounced, l.p50 * 1000, l.p99 * 1000, l.max * 1000, l.n)
    end
    self.queue = nil
  end
  for _, t in ipairs(self.transports or {}) do
    if t.close then pcall(t.close) end
  end
  dns.shutdown()
  if self.spool then
    self.spool:close()
    self.spool = nil
  end
end

-- reload(): every block that can re-read its files does (TLS certificates
-- and keys, DKIM keys). Runs on SIGHUP. Connections are not dropped: each
-- keeps what it started with. Returns true, or nil and the errors (the
-- blocks that failed keep their old state).
function MTA:reload()
  if self.retired then return nil, "a policy reload replaced this MTA" end
  local errs = {}
  tls.reload_clients()
  for _, b in ipairs(self.blocks or {}) do
    if b.reload then
      local ok, err = b.reload(b, self)
      if not ok then errs[#errs + 1] = (b.name or "block") .. ": " .. tostring(err) end
    end
  end
  self.bus:emit("reloaded", #errs == 0, errs)
  if #errs > 0 then return nil, table.concat(errs, "; ") end
  return true
end

-- reload_policy([path [, args]]) -> true | nil, err: run the policy file
-- again (the one `moonpost run` runs, or path) and hand this running MTA
-- over to the MTA it builds: new sessions use the new hooks, blocks and
-- options, sessions in progress finish with the old ones, and the spool,
-- the queue and the sockets of unchanged addresses carry on. When the file
-- fails to load or check, nothing changes and err says why, starting with
-- the file and line where there is one. runtime/reload.lua has the steps.
function MTA:reload_policy(path, args)
  if self.retired then return nil, "a policy reload replaced this MTA already" end
  return reload.policy(_M, self, path, args)
end

-- current() -> the MTA serving now (the latest a reload built), or nil
function _M.current()
  return _M.current_mta
end

-- reload_policy([path [, args]]): mta:reload_policy() of the MTA serving
-- now. SIGHUP and the HTTP API call it.
function _M.reload_policy(path, args)
  local mta = _M.current_mta
  if not mta then return nil, "no MTA is running" end
  return mta:reload_policy(path, args)
end

-- SIGHUP: the policy file again; when that fails (or there is no file, as
-- for an MTA a program started itself), the old policy keeps serving and
-- its blocks read their files again (mta:reload(): certificates, keys,
-- users files).
local function on_sighup(mta)
  log.info("sighup: reloading")
  if policy.source then
    local ok, err = mta:reload_policy()
    if ok then return end
    log.error("reload: %s; the old policy keeps serving", tostring(err))
  end
  local rok, rerr = mta:reload()
  if rok then log.info("reload: done") else log.error("reload: %s", rerr) end
end

-- The watchdog of a process without a supervisor (workers = 1; with
-- workers, the supervisor watches them: runtime/workers.lua): a thread of
-- moonpost.core.proc kills the process when this loop's timer has not beaten
-- for `watchdog` seconds. The timer runs whatever the limit: a reload may
-- turn the watchdog on, change its limit or turn it off (at once after a
-- SIGHUP, at the next beat after a reload through the API). Returns the
-- function that applies the serving MTA's limit.
local function start_watchdog(serving)
  local limit = 0
  local function follow()
    local now = serving().opts.watchdog or 0
    if now == limit then return end
    local ok, err = proc.watchdog(now, log.get_format() == "json")
    limit = now -- (a thread that cannot start is told once)
    if not ok then log.error("%s", err) end
  end
  follow()
  local t = uv.new_timer()
  t:unref() -- (keeps no loop running)
  t:start(1000, 1000, function()
    proc.beat()
    follow()
  end)
  return follow
end

-- run(): start, then run the loop until SIGTERM/SIGINT (or stop()).
function MTA:run()
  if _M.check_mode then
    self.checked = true
    return true
  end
  -- a reload: the MTA is built; the code after run() is for the shutdown
  if _M.reloading then error(policy.REACHED_RUN, 0) end
  if self.opts.workers > 1 and not workers.index then
    -- the supervisor: the workers run the policy (runtime/workers.lua)
    self.ran = true
    local ok, err = workers.supervise(self, self.opts.workers, policy.source)
    if not ok then error(err, 2) end
    return true
  end
  local ok, err = self:start()
  if not ok then error(err, 2) end
  self.ran = true
  local signals = {}
  -- after a reload, the MTA to stop or reload is the one that took over
  local function serving() return _M.current_mta or self end
  local function stop(name)
    local mta = serving()
    log.info("%s: stopping (grace %gs)", name, mta.opts.stop_grace)
    for _, s in ipairs(signals) do if not s:is_closing() then s:close() end end
    mta:stop(nil, function()
      log.info("stopped")
      proc.watchdog(0) -- (the process exits: no longer watched; nothing to stop without one)
      uv.stop()
    end)
  end
  for _, name in ipairs({ "sigterm", "sigint" }) do
    local s = uv.new_signal()
    s:start(name, sched.callback(function() stop(name) end, "signal"))
    signals[#signals + 1] = s
  end
  local follow_watchdog -- (without workers: start_watchdog, below)
  local hup = uv.new_signal()
  hup:start("sighup", sched.callback(function()
    on_sighup(serving())
    if follow_watchdog then follow_watchdog() end
  end, "signal"))
  signals[#signals + 1] = hup
  if workers.index then
    -- the supervisor forwards SIGUSR1: the event log's own handler reopens
    -- its file; a policy without one must not lose the worker to it
    local usr1 = uv.new_signal()
    usr1:start("sigusr1", sched.callback(function()
      for _, el in ipairs(serving().event_logs or {}) do
        if el.open and el.opts.file then return end
      end
      log.info("sigusr1: no event log file to reopen")
    end, "signal"))
    signals[#signals + 1] = usr1
    -- only now: the supervisor sends a ready worker the signals it forwards
    log.info("worker %d: pid %d serving (spool %s)", workers.index, uv.os_getpid(),
      self.opts.spool and self.opts.spool.dir or "none")
    workers.ready()
  else
    follow_watchdog = start_watchdog(serving)
  end
  uv.run("default")
  return true
end

return _M
