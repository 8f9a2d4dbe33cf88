-- The delivery queue: takes messages from the spool to a transport and
-- records the outcome per recipient.
--
--   local q = queue.new(mta, spool, { concurrency = 100, retry = { 30, 60, 300 }, max_age = 432000 })
--   q:set_transport(fn)   -- fn(env, body, rcpts) -> { [i] = { status = ..., text = ... } }
--   q:add(m)              -- a spool entry, due at m.next
--   q:start(), q:stop()
--
-- A transport gets the envelope (env.from, env.rcpt[i].a, ...), the stored
-- message (a string, or a message handle of moonpost.core.smtp that is
-- valid during the call only: use :size(), :write(fd), :tostring()) and
-- the recipients still to do ({ index, address, local, domain }),
-- and returns a result per recipient index: status "delivered", "deferred"
-- or "bounced", with the reply text. A transport that raises defers every
-- recipient. Outcomes raise delivery_delivered / delivery_deferred /
-- delivery_bounced (informational events). A message whose recipients are
-- all final is done; one older than max_age is expired (its remaining
-- recipients bounce with 4.4.7).
local uv = require "luv"
local clock = require "moonpost.runtime.clock"
local mono_ns, wall = clock.mono_ns, clock.time
local sched = require "moonpost.runtime.sched"
local log = require "moonpost.runtime.log"
local ids = require "moonpost.runtime.ids"
local dsn = require "moonpost.runtime.dsn"
local dns = require "moonpost.runtime.dns"
local smtp = require "moonpost.core.smtp"
local has_8bit = smtp.has_8bit
local fifo = require "moonpost.runtime.fifo"
-- (lists sized when made: one grown from {} is rehashed at 1, 2, 3, 5, ...
-- entries, and a table of results by recipient index at its first)
local tnew = require "table.new"
local spool_mod = require "moonpost.runtime.spool"

-- a message's entry: array slots (moonpost.runtime.spool)
local ID, ATTEMPTS, NEXT = spool_mod.ID, spool_mod.ATTEMPTS, spool_mod.NEXT

local floor, min, max = math.floor, math.min, math.max
local find, sub, lower = string.find, string.sub, string.lower

local _M = { _VERSION = "0.1" }

local Queue = {}
local mt = { __index = Queue }

local set_aside, take_slots, give_slots -- (below: one destination does not take every worker)

-- ---- a min-heap of entries by [NEXT] -----------------------------------------------

local function heap_push(h, m)
  local n = #h + 1
  h[n] = m
  while n > 1 do
    local p = floor(n / 2)
    if h[p][NEXT] <= m[NEXT] then break end
    h[n], h[p] = h[p], m
    n = p
  end
end

-- Move h[i] down to its place among the first n entries.
local function sift_down(h, i, n)
  while true do
    local l, r = 2 * i, 2 * i + 1
    local s = i
    if l <= n and h[l][NEXT] < h[s][NEXT] then s = l end
    if r <= n and h[r][NEXT] < h[s][NEXT] then s = r end
    if s == i then return end
    h[i], h[s] = h[s], h[i]
    i = s
  end
end

local function heap_pop(h)
  local top = h[1]
  local n = #h
  local last = h[n]
  h[n] = nil
  n = n - 1
  if n > 0 then
    h[1] = last
    sift_down(h, 1, n)
  end
  return top
end

local function heapify(h)
  local n = #h
  for top = floor(n / 2), 1, -1 do sift_down(h, top, n) end
end

-- ---- queue ------------------------------------------------------------------------------

function _M.new(mta, spool, opts)
  opts = opts or {}
  return setmetatable({
    mta = mta,
    spool = spool,
    concurrency = opts.concurrency or 100,
    per_destination = opts.per_destination or 40,
    retry = opts.retry or { 300, 600, 1200, 2400, 3600 },
    max_age = opts.max_age or 5 * 86400,
    delay_warning = opts.delay_warning,
    domain_opts = opts.domains or {},
    queues = {},      -- "tenant@domain" -> { depth, fifo, head, last_error, last_error_at }
    tenants = {},     -- tenant ("" for none) -> messages queued (known once the envelope was read)
    filters = {},     -- fn(env, rcpt) -> nil | result, before every attempt (moonpost.suppress)
    classify = opts.classify,             -- fn(res) -> class, permanent (moonpost.bounce)
    describe_class = opts.describe_class, -- fn(class) -> text for DSNs
    heap = {},
    workers = {},     -- index -> the worker task
    parked = setmetatable({}, { __mode = "k" }), -- message -> its resume function while held
    wakes = {},       -- held messages' wake times (a heap, see wake_at_ms())
    wakers = setmetatable({}, { __mode = "k" }), -- message -> its entry there while held
    rush = setmetatable({}, { __mode = "k" }),   -- messages expedite() wants again as their attempt ends
    running = 0,
    flight = {},      -- "tenant@domain" -> attempts running for it
    aside = {},       -- "tenant@domain" -> due messages set aside while it has per_destination attempts
    aside_of = setmetatable({}, { __mode = "k" }), -- message -> the key it waits on
    unhold = setmetatable({}, { __mode = "k" }),   -- messages expedite() took from there
    relabeled = {},   -- recovered message -> the queues its attempt counts against once read
    -- message stored by this process -> clock.mono_ns() at its 250, until its
    -- first attempt ends (beside the entry, not in it: see Queue:stored)
    stored_at = setmetatable({}, { __mode = "k" }),
    naside = 0,
    stopped = true,
    transport = nil,
    stats = { delivered = 0, deferred = 0, bounced = 0, attempts = 0 },
    idle = {},        -- workers waiting for work
    latency = {},     -- seconds from the 250 to the first attempt (a window of samples)
    nlatency = 0,
  }, mt)
end

-- Wake an idle worker (new work), or all of them (stop).
local function poke(self, all)
  local idle = self.idle
  if not all then
    local n = #idle
    if n > 0 then
      -- not table.remove: LuaJIT 2.1 aborts every trace through it here
      local w = idle[n]
      idle[n] = nil
      sched.wake(w, true)
    end
    return
  end
  -- every worker waiting now (a worker woken from outside a task runs at
  -- once, and may wait again before this loop is done)
  self.idle = {}
  for _, w in ipairs(idle) do sched.wake(w, true) end
end

-- set_transports(list): { name, deliver, domains } each; a transport with
-- domains takes those domains, the one without takes the rest.
function Queue:set_transports(list)
  self.by_domain, self.default = {}, nil
  for _, t in ipairs(list) do
    if t.domains then
      for _, d in ipairs(t.domains) do
        local other = self.by_domain[d:lower()]
        if other and other ~= t then
          error(string.format("%s and %s both claim the domain %s", other.name, t.name, d), 0)
        end
        self.by_domain[d:lower()] = t
      end
    else
      self.default = t
    end
  end
  self.transport = true
end

function Queue:set_transport(fn)
  self:set_transports({ { name = "transport", deliver = fn } })
end

-- A string field of a result, or nil: anything else is dropped (logged).
local function string_field(res, k, id, who, address)
  local v = res[k]
  if v ~= nil and type(v) ~= "string" then
    log.error("queue: %s: %s gave <%s> a result whose %s is a %s: left out", id, who, address, k, type(v))
    res[k] = nil
  end
end

-- A result as the rest of the queue needs it (docs/spool.md#transports), or
-- nil when it is not a table at all (logged). A field of the wrong type
-- raised later, in a log line or in the DSN, and the message then came back
-- every minute for ever: text is made a string (tostring), code a number
-- (tonumber, else left out), enhanced, host, stage and class strings or
-- nothing, last a reply ({ code = <number>, enhanced, text }) or nothing;
-- a held result without a park function is a deferral. Each change is
-- logged. The table is fixed in place (a transport may give one table to
-- several recipients). who: the transport (a table), or "delivery filter".
local function checked(res, id, who, address)
  if type(res) ~= "table" then
    if type(who) == "table" then who = "transport " .. tostring(who.name) end
    log.error("queue: %s: %s gave <%s> a %s, not a result table", id, who, address, type(res))
    return nil
  end
  local text, code, last = res.text, res.code, res.last
  if (text == nil or type(text) == "string") and (code == nil or type(code) == "number") and last == nil
    and (res.enhanced == nil or type(res.enhanced) == "string") and (res.host == nil or type(res.host) == "string")
    and (res.stage == nil or type(res.stage) == "string") and (res.class == nil or type(res.class) == "string")
    and (res.status ~= "held" or type(res.park) == "function") then
    return res -- (every well-formed result: no more checks)
  end
  if type(who) == "table" then who = "transport " .. tostring(who.name) end
  if text ~= nil and type(text) ~= "string" then
    log.error("queue: %s: %s gave <%s> a result whose text is a %s: taken as a string", id, who, address,
      type(text))
    res.text = tostring(text)
  end
  if code ~= nil and type(code) ~= "number" then
    log.error("queue: %s: %s gave <%s> a result whose code is a %s: %s", id, who, address, type(code),
      tonumber(code) and "taken as a number" or "left out")
    res.code = tonumber(code)
  end
  string_field(res, "enhanced", id, who, address)
  string_field(res, "host", id, who, address)
  string_field(res, "stage", id, who, address)
  string_field(res, "class", id, who, address)
  if last ~= nil and (type(last) ~= "table" or type(last.code) ~= "number"
    or (last.text ~= nil and type(last.text) ~= "string")
    or (last.enhanced ~= nil and type(last.enhanced) ~= "string")) then
    log.error("queue: %s: %s gave <%s> a result whose last is not a reply: left out", id, who, address)
    res.last = nil
  end
  if res.status == "held" and type(res.park) ~= "function" then
    log.error("queue: %s: %s held <%s> without a park function: treated as deferred", id, who, address)
    res.status = "deferred"
  end
  return res
end

-- The transport of domain d for its recipients (group); their results go
-- into results (a table of the queue's own: the caller adds to it). A
-- transport that raises, returns something other than a table, or gives a
-- recipient something other than a result table, leaves that recipient
-- without a result: outcomes() defers it ("transport gave no result").
local function deliver_group(self, env, body, d, group, results)
  local t = self.by_domain[d] or self.default
  if not t then
    local no = { status = "deferred", code = 451, enhanced = "4.4.3", text = "no transport for " .. d }
    for _, r in ipairs(group) do results[r.index] = no end
    return
  end
  local ok, out = xpcall(t.deliver, debug.traceback, env, body, group)
  if not ok then
    log.error("queue: %s: transport %s failed: %s", env.id, t.name, tostring(out))
    return
  end
  if out == nil then return end
  if type(out) ~= "table" then
    log.error("queue: %s: transport %s returned a %s, not a table of results", env.id, t.name, type(out))
    return
  end
  for _, r in ipairs(group) do
    local res = out[r.index]
    if res ~= nil then results[r.index] = checked(res, env.id, t, r.address) end
  end
end

local settle

-- Deliver a message's recipients: one call of the right transport per
-- recipient domain, one domain after the other. Returns results by
-- recipient index, and the recipients already settled (see settle()), or
-- nil. m and now: the attempt's message and time (without them, nothing
-- is settled on the way).
function Queue:dispatch(env, body, rcpts, m, now)
  local results = tnew(#rcpts, 0)
  if #rcpts == 1 then
    -- one recipient (the common case): no grouping by domain
    deliver_group(self, env, body, rcpts[1].domain:lower(), rcpts, results)
    return results
  end
  local groups, order = {}, {}
  for _, r in ipairs(rcpts) do
    local d = r.domain:lower()
    if not groups[d] then
      groups[d] = {}
      order[#order + 1] = d
    end
    local g = groups[d]
    g[#g + 1] = r
  end
  local settled
  for k, d in ipairs(order) do
    deliver_group(self, env, body, d, groups[d], results)
    -- another domain follows, which may take long (a next hop that never
    -- greets): what this one delivered is recorded now
    if m and k < #order then settled = settle(self, m, env, body, groups[d], results, now, settled) end
  end
  return results, settled
end

function Queue:add(m)
  heap_push(self.heap, m)
  poke(self)
end

-- stored(m, env): a message the spool has just made durable (its 250 is
-- on the way) joins its queues. The time of the 250 is kept beside the
-- entry, not in it, and only until the first attempt ends (the latency
-- metrics, and max_age to the nanosecond); not at all by a queue without
-- a transport, which never attempts (an accept-only policy).
function Queue:stored(m, env)
  if self.transport then self.stored_at[m] = mono_ns() end
  self:account(m, env)
  return self:add(m)
end

-- The longest wait the retry schedules give (the queue's and the domains').
local function longest_retry(self)
  local most = 0
  for _, v in ipairs(self.retry) do most = max(most, v) end
  for _, d in pairs(self.domain_opts) do
    for _, v in ipairs(d.retry or {}) do most = max(most, v) end
  end
  return most
end

-- recover(): the messages the spool recovered at start go into the queue.
-- A retry time further ahead than the longest retry interval was set by a
-- clock that has since gone back (a wrong time at an earlier start): such a
-- message is due now, or it would wait that long, past its max_age too.
function Queue:recover()
  local now = wall()
  local limit, ahead = now + longest_retry(self), 0
  self.spool:each(function(m)
    if m[NEXT] > limit then
      m[NEXT] = now
      ahead = ahead + 1
    end
    self:account(m) -- its domains are known after its first read
    heap_push(self.heap, m)
  end)
  if ahead > 0 then
    log.warn("queue: %d recovered messages had retry times more than the longest retry interval ahead "
      .. "(the clock went back since they were set): due now", ahead)
  end
  poke(self)
end

-- ---- scheduled queues: counters per tenant@domain ------------------------------------

local UNREAD = "?" -- recovered messages until their first attempt reads the envelope

local function queue_of(self, key)
  local Q = self.queues[key]
  if not Q then
    Q = { depth = 0, fifo = fifo.new() }
    self.queues[key] = Q
  end
  return Q
end

local function has_key(m, key)
  local k = m.key
  if k == key then return true end
  if type(k) == "table" then
    for _, x in ipairs(k) do if x == key then return true end end
  end
  return false
end

-- the position of an address's last @ (nil without one): plain finds,
-- which LuaJIT compiles, where a pattern such as "^(.*)@([^@]*)$" runs in
-- the C matcher and backtracks over the whole address
local function last_at(a)
  local at, i = nil, 0
  repeat
    i = find(a, "@", i + 1, true)
    if i then at = i end
  until not i
  return at
end

-- the domain of an address (after its last @; "" without one)
local function domain_of(a)
  local at = last_at(a)
  return at and sub(a, at + 1) or ""
end

local function queue_key(env, r)
  return (env.tenant or "") .. "@" .. lower(domain_of(r.a))
end

-- account(m, env): count m in the queue of every tenant@domain it still has
-- recipients for (env nil: a recovered message not read yet).
function Queue:account(m, env)
  local keys
  local rcpt = env and env.rcpt
  if rcpt and #rcpt == 1 and not rcpt[1].done and not (m.rdone and m.rdone[1]) then
    -- one recipient (the common case): no lists to build
    local key = queue_key(env, rcpt[1])
    m.key = key
    if m.tenant == nil then
      local t = env.tenant or ""
      m.tenant = t
      self.tenants[t] = (self.tenants[t] or 0) + 1
    end
    local Q = queue_of(self, key)
    Q.depth = Q.depth + 1
    fifo.push(Q.fifo, m)
    return
  end
  if env then
    local seen = {}
    keys = {}
    for i, r in ipairs(rcpt) do
      if not r.done and not (m.rdone and m.rdone[i]) then
        local key = queue_key(env, r)
        if not seen[key] then
          seen[key] = true
          keys[#keys + 1] = key
        end
      end
    end
  else
    keys = { UNREAD }
  end
  m.key = #keys == 1 and keys[1] or keys
  if env and m.tenant == nil then
    local t = env.tenant or ""
    m.tenant = t
    self.tenants[t] = (self.tenants[t] or 0) + 1
  end
  for _, key in ipairs(keys) do
    local Q = queue_of(self, key)
    Q.depth = Q.depth + 1
    fifo.push(Q.fifo, m)
  end
end

-- Rebuild a queue's FIFO from its live entries. Done when stale entries
-- (finished, or moved on to other queues) outnumber live ones, so a FIFO
-- holds at most about twice its depth whatever the order messages finish
-- in, and finished messages are not kept alive by it.
local function compact_fifo(self, Q, key)
  fifo.keep(Q.fifo, function(m)
    return m.key ~= nil and self.spool:get(m[ID]) == m and has_key(m, key)
  end)
end

local function unaccount_key(self, key)
  local Q = self.queues[key]
  if Q then
    Q.depth = Q.depth - 1
    if fifo.len(Q.fifo) > 2 * Q.depth + 64 then compact_fifo(self, Q, key) end
  end
end

function Queue:unaccount(m)
  local k = m.key
  if not k then return end
  m.key = nil
  if type(k) == "table" then
    for _, key in ipairs(k) do unaccount_key(self, key) end
  else
    unaccount_key(self, k) -- one queue (the common case): no list made
  end
end

-- summary() -> one entry per queue with messages: depth, the age of its
-- oldest message and its last error. O(queues); the FIFO's stale heads are
-- dropped as they are met.
function Queue:summary()
  local out, now = {}, wall()
  for key, Q in pairs(self.queues) do
    if Q.depth <= 0 and not Q.last_error then
      self.queues[key] = nil
    else
      local oldest
      local f = Q.fifo
      local m = fifo.peek(f)
      while m do
        if self.spool:get(m[ID]) == m and has_key(m, key) then
          oldest = now - ids.time_of(m[ID])
          break
        end
        fifo.pop(f)
        m = fifo.peek(f)
      end
      local tenant, domain = key:match("^(.-)@(.*)$")
      local l = self.aside[key]
      out[#out + 1] = { key = key, tenant = tenant, domain = domain, depth = Q.depth, oldest = oldest,
        last_error = Q.last_error, last_error_at = Q.last_error_at, active = self.flight[key] or 0,
        set_aside = l and l.live or 0 }
    end
  end
  table.sort(out, function(a, b) return a.depth > b.depth end)
  return out
end

-- tenant_depth(tenant) -> messages of that tenant in the queue (those
-- recovered at start count once their envelope has been read).
function Queue:tenant_depth(tenant)
  return self.tenants[tenant or ""] or 0
end

-- A message is finished: it leaves its tenant's count.
local function finished(self, m)
  local t = m.tenant
  if t ~= nil then
    self.tenants[t] = self.tenants[t] - 1
    m.tenant = nil
  end
  return self.spool:done(m[ID])
end

-- add_filter(fn): fn(env, rcpt) runs before each delivery attempt of each
-- recipient; nil lets it go on, a result table ends it without an attempt:
-- { status = "bounced" | "suppressed", code, enhanced, text }. "suppressed"
-- finishes the recipient silently (no DSN) and raises delivery_suppressed;
-- a "bounced" result with dsn = false sends no DSN. { status = "held",
-- text, park = fn } holds the message without counting an attempt, as a
-- transport may (moonpost.admin's suspensions).
function Queue:add_filter(fn)
  self.filters[#self.filters + 1] = fn
end

local function split(address)
  local at = last_at(address)
  if not at then return address, "" end
  return sub(address, 1, at - 1), sub(address, at + 1)
end

-- Send a DSN about some of a message's recipients to its sender, through
-- the spool and the queue like any message. Never to the null sender: a
-- bounce of a bounce is logged and dropped.
function Queue:notify(env, body, action, list)
  if #list == 0 then return true end
  if (env.from or "") == "" then
    log.info("%s: %s DSN for %d recipients not sent: the sender is <> (bounce of a bounce)", env.id,
      action, #list)
    return true
  end
  local text = dsn.build({ hostname = self.mta.hostname, env = env, body = body, action = action,
    recipients = list })
  -- A DSN returns the message as it came, 8-bit octets included: BODY=8BITMIME
  -- then, as for any 8-bit message. dsn = true lets the SMTP client send
  -- the returned message's header section alone to a next hop that cannot
  -- take the whole (runtime/client.lua): a DSN that bounces is lost.
  -- dsn_of: what this DSN makes final in the original (its failed
  -- recipients, its delay warning), for a recovery after a crash that came
  -- before the original's own state record was synced (runtime/spool.lua)
  local done
  if action == "failed" then
    done = {}
    for _, e in ipairs(list) do done[#done + 1] = e.index end
  end
  local txn = { id = ids.next(), sender = { address = "" }, recipients = { { address = env.from } },
    received_at = wall(), smtputf8 = env.utf8 or nil, notes = {},
    body_type = has_8bit(text) and "8BITMIME" or "7BIT", dsn = true,
    dsn_of = env.id and { id = env.id, action = action, done = done } or nil }
  local msg = smtp.message(text)
  local ok, err = self.spool:store(txn, msg)
  if not txn.kept then msg:close() end
  if ok then
    log.info("%s: delivery status notification %s to <%s>: %s, %d recipients", env.id, txn.id, env.from,
      action, #list)
    self.mta.bus:emit("delivery_dsn", env, { id = txn.id, action = action, to = env.from, recipients = list })
  else
    log.error("%s: cannot queue the %s DSN: %s", env.id, action, tostring(err))
  end
  return ok
end

-- the queue options of a recipient domain (lower case): the keys are in
-- A-labels, and a domain in UTF-8 finds its entry by its A-label form
local function domain_opt(self, domain)
  if domain == nil then return nil end
  local d = self.domain_opts[domain]
  if d == nil and has_8bit(domain) then
    local a = dns.to_ascii(domain)
    d = a and self.domain_opts[a]
  end
  return d
end

local function retry_after(self, attempts, domain)
  local d = domain_opt(self, domain)
  local r = d and d.retry or self.retry
  return r[min(attempts, #r)]
end

-- The whole second at which a retry `after` seconds from now is due: never
-- earlier than `after` (the queue's clock counts whole seconds, and a wake
-- for other work may look at the heap at any moment of a second).
local function due_after(after)
  local sec, usec = uv.gettimeofday()
  return math.ceil(sec + usec / 1e6 + after)
end

local function max_age_of(self, domain)
  local d = domain_opt(self, domain)
  return d and d.max_age or self.max_age
end

-- "[192.0.2.1]:25 RCPT TO: 550 5.1.1 no such user" for the logs
local function describe(res)
  local parts = {}
  if res.host then parts[#parts + 1] = res.host end
  if res.stage then parts[#parts + 1] = res.stage .. ":" end
  if res.code then parts[#parts + 1] = tostring(res.code) end
  if res.enhanced and res.code then parts[#parts + 1] = res.enhanced end
  parts[#parts + 1] = tostring(res.text)
  return table.concat(parts, " ")
end

local LATENCY_SAMPLES = 100000

-- add_entry(list, r, res, now, class_text) -> list with the DSN entry of
-- recipient r appended (list made when nil)
local function add_entry(list, r, res, now, class_text)
  list = list or {}
  list[#list + 1] = { address = r.address, orcpt = r.orcpt, code = res.code, enhanced = res.enhanced,
    text = res.text, host = res.host, attempt_time = now, class = res.class, class_text = class_text,
    last = res.last }
  return list
end

-- A delivered recipient: counted, logged, its event fired. Returns the
-- kind of DSN it gets ("relayed", "delivered") or nil.
local function delivered_one(self, m, env, r, res, now, domain)
  local mc, tenant = self.mta.counters, env.tenant or ""
  self.stats.delivered = self.stats.delivered + 1
  if mc then
    mc.delivered:inc(tenant, domain)
    -- from the durable 250 (or, for a message recovered at start, its arrival) to the remote 250
    local stored_at = self.stored_at[m]
    mc.latency:observe(stored_at and (mono_ns() - stored_at) / 1e9 or max(0, now - (env.t or now)), tenant)
  end
  log.info("%s: to=<%s> delivered: %s", env.id, r.address, tostring(res.text))
  self.mta.bus:emit("delivery_delivered", env, r, res)
  if res.relayed then
    if dsn.wants(r.notify, "relayed") then return "relayed" end
  elseif res.final and dsn.wants(r.notify, "delivered") then
    return "delivered"
  end
end

-- The delivered recipients of a domain that another domain of the message
-- follows: settled at once (logged, their events, recorded as done in the
-- spool, their delivered / relayed DSNs queued) instead of when the whole
-- attempt ends, so that a crash or a stop while a later domain is slow does
-- not deliver them a second time after the restart. The state record goes
-- to the file with the others of this loop iteration, before the next
-- domain's transport can wait for anything. Other outcomes wait for the end
-- of the attempt (a bounce repeated after a crash delivers nothing twice,
-- and its DSN then still reports every bounce of the attempt at once).
-- Returns settled (made when nil): index -> true.
function settle(self, m, env, body, group, results, now, settled)
  local done, relayed, delivered
  for _, r in ipairs(group) do
    local res = results[r.index]
    if res and res.status == "delivered" then
      done = done or {}
      done[#done + 1] = r.index
      local kind = delivered_one(self, m, env, r, res, now, r.domain:lower())
      if kind == "relayed" then
        relayed = add_entry(relayed, r, res, now)
      elseif kind == "delivered" then
        delivered = add_entry(delivered, r, res, now)
      end
    end
  end
  if not done then return settled end
  settled = settled or {}
  for _, i in ipairs(done) do
    settled[i] = true
    -- the next domains' transports see them done, as a later attempt would
    env.rcpt[i].done = true
  end
  self.spool:update(m[ID], { done = done, attempts = m[ATTEMPTS] })
  if delivered then self:notify(env, body, "delivered", delivered) end
  if relayed then self:notify(env, body, "relayed", relayed) end
  return settled
end

local attempt, outcomes, failed_attempt

local function deliver(self, m)
  local spool = self.spool
  local stored_at = self.stored_at[m]
  if stored_at and m[NEXT] == 0 then
    -- from the durable 250 to this first attempt (stored_at stays for the
    -- delivery latency metric)
    local n = self.nlatency % LATENCY_SAMPLES + 1
    self.latency[n] = (mono_ns() - stored_at) / 1e9
    self.nlatency = self.nlatency + 1
  end
  local env, body, owned = spool:read(m, true)
  if owned then
    -- the spool's cached copy, now this attempt's alone (the cache can no
    -- longer close it under a delivery): freed here, not whenever the
    -- collector gets to a small userdata holding a large buffer
    local ok, err = xpcall(attempt, debug.traceback, self, m, env, body)
    body:close()
    if not ok then error(err, 0) end
    return
  end
  return attempt(self, m, env, body)
end

-- ---- held messages' wake times: one timer for them all ---------------------------------

-- self.wakes is a min-heap of { next = <loop time, ms>, m, resume, pos }
-- that knows each entry's position (pos), so that a message a gate lets go
-- leaves it at once: a timer per held message cost some 700 bytes each, and
-- a throttled site can hold a million messages.
local function wake_up(h, i)
  local e = h[i]
  while i > 1 do
    local p = floor(i / 2)
    local pe = h[p]
    if pe.next <= e.next then break end
    h[i], pe.pos = pe, i
    i = p
  end
  h[i], e.pos = e, i
end

local function wake_down(h, i)
  local n, e = #h, h[i]
  while true do
    local c = 2 * i
    if c > n then break end
    if c < n and h[c + 1].next < h[c].next then c = c + 1 end
    local ce = h[c]
    if ce.next >= e.next then break end
    h[i], ce.pos = ce, i
    i = c
  end
  h[i], e.pos = e, i
end

local function wake_remove(h, e)
  local i, n = e.pos, #h
  if not i or h[i] ~= e then return end
  e.pos = nil
  local last = h[n]
  h[n] = nil
  if i < n then
    h[i], last.pos = last, i
    wake_down(h, i)
    wake_up(h, last.pos)
  end
end

local wake_due

-- The timer set for the first entry; closed while there is none, and while
-- the queue is stopped (an open handle would outlive it; start() sets it
-- again).
local function arm_wakes(self)
  local top, t = self.wakes[1], self.wake_timer
  if not top or self.stopped then
    if t then
      self.wake_timer = nil
      if not t:is_closing() then t:close() end
    end
    return
  end
  if not t then
    t = uv.new_timer()
    t:unref()
    self.wake_timer = t
    self.wake_cb = self.wake_cb or sched.callback(function() wake_due(self) end, "queue: held messages")
  end
  t:start(max(0, top.next - uv.now()), 0, self.wake_cb)
end

-- The timer fired: every entry that is due takes its message back.
function wake_due(self)
  local h, now = self.wakes, uv.now()
  while h[1] and h[1].next <= now do
    local e = h[1]
    wake_remove(h, e)
    e.resume()
  end
  arm_wakes(self)
end

-- A held message comes back by itself ms milliseconds from now, unless its
-- gate lets it go first (resume() then drops the entry).
local function wake_at_ms(self, m, resume, ms)
  -- from the loop's time brought up to date: a timer counts from the
  -- cached time, which may be behind, and an early wake holds it again
  uv.update_time()
  local e = { next = uv.now() + ms, m = m, resume = resume }
  local h = self.wakes
  local n = #h + 1
  h[n] = e
  wake_up(h, n)
  self.wakers[m] = e
  if e.pos == 1 then arm_wakes(self) end
end

-- A held message's wake entry, dropped (its park is over).
local function drop_waker(self, m)
  local e = self.wakers[m]
  if e then
    self.wakers[m] = nil
    wake_remove(self.wakes, e)
    if not self.wakes[1] then arm_wakes(self) end
  end
end

-- A message some of whose recipients a gate (or a suspension) holds: its
-- state recorded, it waits for the gate to call it back. (A function of its
-- own: the closure made here kept LuaJIT from compiling attempt, NYI
-- bytecode UCLO.)
-- The message also comes back by itself, even if the gate is still closed,
-- at whichever comes first of: wake_at, the time the first of its deferred
-- recipients is due (when it has some, m.rnext); and expire_in seconds from
-- now, when the first held recipient reaches its max_age (that attempt then
-- expires it, docs/shape.md). Only the latest park's resume function takes
-- it back, so a gate that calls an older one later does nothing: the
-- message is never in the heap twice.
local function park(self, m, env, held, done, attempted, wake_at, expire_in)
  local spool = self.spool
  if #done > 0 or attempted then
    spool:update(m[ID], { done = #done > 0 and done or nil, attempts = m[ATTEMPTS], next = m[NEXT],
      warned = m.warned or nil })
  end
  if spool:get(m[ID]) then
    self:account(m, env)
    -- the resume function of the latest park only: expedite() may take
    -- the message back before the gate (or suspension) calls an older one
    local function resume()
      if self.parked[m] ~= resume then return end
      self.parked[m] = nil
      drop_waker(self, m)
      if spool:get(m[ID]) ~= m then return end
      m[NEXT] = wall()
      -- a stopped queue (a reload to a policy without a transport, a
      -- shaper stopping at a reload) keeps it in the heap for its start()
      if self.stopped then heap_push(self.heap, m) else self:add(m) end
    end
    self.parked[m] = resume
    local ms = math.ceil(expire_in * 1000) + 1
    if wake_at then ms = min(ms, max(0, wake_at - wall()) * 1000) end
    wake_at_ms(self, m, resume, ms)
    if self.rush[m] then
      self.rush[m] = nil
      resume()
    else
      held.park(resume)
    end
  end
end

-- The delivery filters' verdict on a recipient: nil (go on) or a result.
-- A filter that raises, or returns something other than a result table,
-- defers the recipient (logged): what it had to decide (a suppression, a
-- suspension, a purge) is not known, and the next attempt asks again.
local function filtered(filters, env, rc)
  for f = 1, #filters do
    local ok, res = xpcall(filters[f], debug.traceback, env, rc)
    if not ok then
      log.error("queue: %s: delivery filter failed for <%s>: %s", env.id, rc.address, tostring(res))
      return { status = "deferred", code = 451, enhanced = "4.3.0", text = "delivery filter failed" }
    end
    if res then
      return checked(res, env.id, "delivery filter", rc.address)
        or { status = "deferred", code = 451, enhanced = "4.3.0", text = "delivery filter failed" }
    end
  end
end

function attempt(self, m, env, body)
  local now = wall()
  if not env then
    log.error("queue: %s: %s", ids.hex(m[ID]), tostring(body))
    if now - ids.time_of(m[ID]) >= self.max_age then
      -- unreadable until it expired: give up on it (the record stays in
      -- its segment for inspection until the segment is reclaimed)
      log.error("queue: %s: dropped: unreadable for longer than max_age", ids.hex(m[ID]))
      self:unaccount(m)
      return finished(self, m)
    end
    m[NEXT] = now + 60
    return self:add(m)
  end
  if m.key == UNREAD then
    -- recovered at start: its queues are known now, and its attempt counts
    -- against them (per_destination), or it waits, set aside, as others do
    self:unaccount(m)
    self:account(m, env)
    if not self.rush[m] and set_aside(self, m) then return end
    self.relabeled[m] = take_slots(self, m)
  end
  local nr = #env.rcpt
  local rcpts, todo = tnew(nr, 0), tnew(nr, 0)
  local filters, early = self.filters, nil
  -- recipients deferred in an attempt that a gate also held (park): not
  -- tried before their own retry time
  local rnext, waiting = m.rnext, nil
  for i, r in ipairs(env.rcpt) do
    if not r.done and rnext and rnext[i] and rnext[i] > now then
      waiting = waiting or {}
      waiting[i] = rnext[i]
    elseif not r.done then
      local l, d = split(r.a)
      local rc = { index = i, address = r.a, ["local"] = l, domain = d, notify = r.n, orcpt = r.o,
        attempt = (m[ATTEMPTS] or 0) + 1 }
      rcpts[#rcpts + 1] = rc
      local res = #filters > 0 and filtered(filters, env, rc) or nil
      if res then
        early = early or {}
        early[i] = res
      else
        todo[#todo + 1] = rc
      end
    end
  end
  m[ATTEMPTS] = (m[ATTEMPTS] or 0) + 1
  self.stats.attempts = self.stats.attempts + 1
  local results, settled
  if #todo > 0 then
    results, settled = self:dispatch(env, body, todo, m, now)
  else
    results = {}
  end
  return outcomes(self, m, env, body, rcpts, results, early, now, waiting, settled)
end

-- The attempt's results, recipient by recipient: the spool, the counters,
-- the DSNs, the events, and the next attempt. settled: the recipients
-- dispatch() settled on the way (done already). (A function of its own: code
-- after a wait, which dispatch() is, runs in LuaJIT's interpreter until it
-- enters a function, where a compiled trace can start.)
function outcomes(self, m, env, body, rcpts, results, early, now, waiting, settled)
  local spool, bus = self.spool, self.mta.bus
  if early then
    for i, res in pairs(early) do results[i] = res end
  end
  local done, deferred = tnew(#rcpts, 0), 0
  -- the recipients each kind of DSN reports on, made when one needs it
  local failed, delivered, relayed, delayed
  -- The message's age, for max_age: to the nanosecond while this process
  -- holds it (stored_at); after a restart only the whole seconds of its
  -- arrival are known, and one is taken off, so that it never expires
  -- early (whole seconds on both sides made it up to a second early).
  local age
  local stored_at = self.stored_at[m]
  if stored_at then
    age = (mono_ns() - stored_at) / 1e9
  else
    age = now - (env.t or ids.time_of(m[ID])) - 1
  end
  -- the metrics (moonpost.metrics) count each recipient's outcome
  local mc, tenant = self.mta.counters, env.tenant or ""
  local next_at
  -- (settled recipients were delivered: this was an attempt)
  local held, attempted = nil, settled ~= nil
  -- seconds until the first held recipient reaches its max_age
  local hold_left
  -- each deferred recipient's retry time, kept when a gate holds others
  local dnext = waiting
  for _, r in ipairs(rcpts) do
    if settled and settled[r.index] then goto next_rcpt end
    local domain = r.domain:lower()
    local expired = age >= max_age_of(self, domain)
    local res = results[r.index] or { status = "deferred", text = "transport gave no result" }
    if res.status == "held" then
      -- shaping: no attempt was made; the message waits for its gate
      if not expired then
        held = held or res
        -- until the first held recipient expires at the latest
        local left = max_age_of(self, domain) - age
        if not hold_left or left < hold_left then hold_left = left end
        goto next_rcpt
      end
      -- reached max_age while held: it expires as a deferral would (the
      -- text names what held it; there was no reply to quote)
      res = { status = "deferred", text = "held: " .. tostring(res.text) }
    elseif res.status ~= "suppressed" then
      attempted = true
    end
    if res.status == "suppressed" then
      done[#done + 1] = r.index
      self.stats.suppressed = (self.stats.suppressed or 0) + 1
      if mc then mc.suppressed:inc(tenant) end
      log.info("%s: to=<%s> suppressed: %s", env.id, r.address, tostring(res.text))
      bus:emit("delivery_suppressed", env, r, res)
      goto next_rcpt
    end
    if res.status ~= "delivered" and res.status ~= "bounced" and res.status ~= "deferred" then
      log.error("%s: transport returned status %s for <%s>; treated as deferred", env.id,
        tostring(res.status), r.address)
      res = { status = "deferred", text = res.text }
    end
    if res.status == "deferred" and expired then
      -- the last attempt's server and reply stay (the DSN's Remote-MTA and
      -- Diagnostic-Code)
      res = { status = "bounced", text = "4.4.7 message expired: " .. tostring(res.text), expired = true,
        host = res.host, last = res.code and { code = res.code, enhanced = res.enhanced, text = res.text,
        stage = res.stage } or nil }
    end
    local class_text
    if res.status ~= "delivered" then
      -- the bounce class (docs/bounce.md): the MTA gives the queue its
      -- classifier (the policy's moonpost.bounce block, or the shipped rules)
      local classify = self.classify
      if res.class == nil and classify then res.class, res.permanent = classify(res) end
      class_text = res.class and self.describe_class and self.describe_class(res.class)
    end
    if res.status == "delivered" then
      done[#done + 1] = r.index
      local kind = delivered_one(self, m, env, r, res, now, domain)
      if kind == "relayed" then
        relayed = add_entry(relayed, r, res, now, class_text)
      elseif kind == "delivered" then
        delivered = add_entry(delivered, r, res, now, class_text)
      end
    elseif res.status == "bounced" then
      done[#done + 1] = r.index
      self.stats.bounced = self.stats.bounced + 1
      if mc then mc.bounced:inc(tenant, res.class or "uncategorized", res.permanent and "hard" or "soft") end
      log.warn("%s: to=<%s> bounced: %s (%s, %s)", env.id, r.address, describe(res), tostring(res.class),
        res.permanent and "hard" or "soft")
      bus:emit("delivery_bounced", env, r, res)
      if res.dsn ~= false and dsn.wants(r.notify, "failed") then
        failed = add_entry(failed, r, res, now, class_text)
        local entry = failed[#failed]
        entry.index = r.index
        if not entry.enhanced then entry.enhanced = tostring(res.text):match("^([245]%.%d+%.%d+)") end
      end
    else
      deferred = deferred + 1
      self.stats.deferred = self.stats.deferred + 1
      if mc then mc.deferred:inc(tenant, domain) end
      local at = due_after(retry_after(self, m[ATTEMPTS], domain))
      if not next_at or at < next_at then next_at = at end
      dnext = dnext or {}
      dnext[r.index] = at
      log.info("%s: to=<%s> deferred: %s (%s, %s)", env.id, r.address, describe(res), tostring(res.class),
        res.permanent and "hard" or "soft")
      bus:emit("delivery_deferred", env, r, res)
      if self.delay_warning and not m.warned and now - (env.t or now) >= self.delay_warning
        and (r.notify == nil or dsn.wants(r.notify, "delayed")) then
        delayed = add_entry(delayed, r, res, now, class_text)
        delayed[#delayed].will_retry_until = (env.t or now) + max_age_of(self, domain)
      end
    end
    ::next_rcpt::
  end
  -- A bounce is final only with its DSN queued (the disk may be full): if
  -- the DSN cannot be stored, its recipients are not final and are tried
  -- (and bounced) again at the next attempt.
  if failed and not self:notify(env, body, "failed", failed) then
    local undone = {}
    for _, e in ipairs(failed) do undone[e.index] = true end
    local keep = {}
    for _, i in ipairs(done) do
      if not undone[i] then keep[#keep + 1] = i end
    end
    done = keep
    deferred = deferred + #failed
    local at = due_after(retry_after(self, m[ATTEMPTS]))
    if not next_at or at < next_at then next_at = at end
  end
  if delivered then self:notify(env, body, "delivered", delivered) end
  if relayed then self:notify(env, body, "relayed", relayed) end
  if delayed then
    self:notify(env, body, "delayed", delayed)
    m.warned = true
  end
  -- the queues' counters and last errors
  for _, r in ipairs(rcpts) do
    local res = results[r.index]
    if res and res.status ~= "delivered" then
      local Q = queue_of(self, (env.tenant or "") .. "@" .. r.domain:lower())
      Q.last_error = (res.code and (res.code .. " ") or "") .. (res.enhanced and (res.enhanced .. " ") or "")
        .. tostring(res.text)
      Q.last_error_at = now
    end
  end
  -- recipients not yet due were not part of this attempt
  if waiting then
    for _, at in pairs(waiting) do
      deferred = deferred + 1
      if not next_at or at < next_at then next_at = at end
    end
  end
  if not attempted then
    -- held, suppressed or not yet due only: this was not a delivery attempt
    m[ATTEMPTS] = m[ATTEMPTS] - 1
    self.stats.attempts = self.stats.attempts - 1
  end
  self:unaccount(m)
  -- the first attempt has ended: later ones go by the arrival's whole seconds
  if stored_at then self.stored_at[m] = nil end
  -- (cleared only when set: a nil store would add a key to every message)
  if deferred == 0 and not held then
    if m.rnext then m.rnext = nil end
    finished(self, m)
    return
  end
  if held then
    -- The gate decides when the held recipients are tried; the deferred
    -- ones keep their own retry times (and expiry): the message comes back
    -- at the gate's call or the first of those, each time trying only the
    -- recipients that are due.
    m.rnext = dnext
    return park(self, m, env, held, done, attempted, dnext and next_at or nil, hold_left)
  end
  if m.rnext then m.rnext = nil end
  m[NEXT] = next_at or due_after(retry_after(self, m[ATTEMPTS]))
  if self.rush[m] then
    self.rush[m] = nil
    m[NEXT] = wall()
  end
  spool:update(m[ID], { done = #done > 0 and done or nil, attempts = m[ATTEMPTS], next = m[NEXT],
    warned = m.warned or nil })
  if spool:get(m[ID]) then
    self:account(m, env)
    self:add(m)
  end
end

-- A message that was tried for longer than max_age, each attempt failing
-- with an error: its recipients still to do expire through outcomes(), as
-- deferred ones would (logged, delivery_bounced, a failed DSN), without
-- another call of a transport or a filter. Returns true when that went
-- through.
local function expire_failed(self, m)
  local env, body, owned = self.spool:read(m, true)
  if not env then return false end
  local rcpts, results = {}, {}
  for i, r in ipairs(env.rcpt) do
    if not r.done then
      local l, d = split(r.a)
      rcpts[#rcpts + 1] = { index = i, address = r.a, ["local"] = l, domain = d, notify = r.n, orcpt = r.o,
        attempt = m[ATTEMPTS] }
      results[i] = { status = "deferred", text = "4.3.0 every attempt failed with an internal error" }
    end
  end
  if m.rnext then m.rnext = nil end
  local ok, err = xpcall(outcomes, debug.traceback, self, m, env, body, rcpts, results, nil, wall())
  if owned then body:close() end
  if not ok then log.error("queue: %s: %s", ids.hex(m[ID]), tostring(err)) end
  return ok
end

-- An attempt that raised (a bug, in the queue or in a block it calls: the
-- log has the traceback). What it settled on the way stays recorded
-- (settle()); the attempt is recorded and the message tried again after
-- the queue's retry interval. Once it was received max_age ago (the
-- queue's own max_age, as for an unreadable message), its recipients still
-- to do expire instead (expire_failed()); if even that fails, it is
-- dropped.
function failed_attempt(self, m)
  local spool = self.spool
  -- a gate or a suspension that took the message before the error must not
  -- hand it back as well: it goes into the heap once
  self.parked[m] = nil
  drop_waker(self, m)
  self.rush[m] = nil
  if spool:get(m[ID]) ~= m then return end -- finished before the error
  local now = wall()
  if now - ids.time_of(m[ID]) >= self.max_age then
    if expire_failed(self, m) then return end
    log.error("queue: %s: dropped: its attempts failed for longer than max_age", ids.hex(m[ID]))
    self:unaccount(m)
    return finished(self, m)
  end
  if m.rnext then m.rnext = nil end
  self.stored_at[m] = nil
  m[NEXT] = due_after(retry_after(self, max(1, m[ATTEMPTS] or 1)))
  spool:update(m[ID], { attempts = m[ATTEMPTS], next = m[NEXT], warned = m.warned or nil })
  -- (counted under "?" again if the error came after it left its queues)
  if m.key == nil then self:account(m) end
  self:add(m)
end

-- ---- one destination does not take every worker ---------------------------------------
--
-- At most per_destination attempts run at once for one queue (tenant@domain):
-- a destination that answers slowly, or not at all until a timeout, would
-- otherwise hold every worker, its attempts waiting for its connections,
-- while mail for every other destination waits behind them. A due message
-- whose queues are all that busy is set aside, and goes back to the heap
-- when one of their attempts ends. (A message with several domains is
-- attempted when any of them has room.)

-- a list of m's queue keys that stays as it is (m.key may change meanwhile),
-- or its one key (a string: no table made for the common case)
local function keys_now(k)
  if type(k) ~= "table" then return k end
  local copy = {}
  for i, x in ipairs(k) do copy[i] = x end
  return copy
end

local function crowded(self, key)
  return key ~= UNREAD and (self.flight[key] or 0) >= self.per_destination
end

-- the list of messages set aside for key x gets m
local function add_aside(self, x, m)
  local l = self.aside[x]
  if not l then
    l = { list = fifo.new(), live = 0 }
    self.aside[x] = l
  end
  fifo.push(l.list, m)
  l.live = l.live + 1
end

local function left_aside(self, x)
  local l = self.aside[x]
  if l then l.live = l.live - 1 end
end

-- set_aside(m) -> true when m waits for a busy destination instead of an attempt now.
-- A message with several domains waits in the list of each (the first of
-- them with room takes it): aside_of[m] is its keys while it waits, and an
-- entry whose message has left (taken by another list, or expedited) is
-- dropped when its list gets to it (l.live counts the others).
function set_aside(self, m)
  local k = m.key
  if k == nil then return false end
  if self.unhold[m] then
    self.unhold[m] = nil -- wanted now (expedite): not set aside again
    return false
  end
  if type(k) == "table" then
    for _, x in ipairs(k) do
      if not crowded(self, x) then return false end
    end
    k = keys_now(k)
  elseif not crowded(self, k) then
    return false
  end
  if type(k) == "table" then
    for _, x in ipairs(k) do add_aside(self, x, m) end
  else
    add_aside(self, k, m)
  end
  self.aside_of[m] = k
  self.naside = self.naside + 1
  return true
end

-- take m out of the messages set aside: true if it was (its entries stay
-- in the lists, dropped as they come up)
local function unset_aside(self, m)
  local k = self.aside_of[m]
  if not k then return false end
  self.aside_of[m] = nil
  self.naside = self.naside - 1
  if type(k) == "table" then
    for _, x in ipairs(k) do left_aside(self, x) end
  else
    left_aside(self, k)
  end
  return true
end

-- the queues an attempt of m counts against (m.key may change meanwhile)
function take_slots(self, m)
  local k = keys_now(m.key)
  if k == nil then return nil end
  local f = self.flight
  if type(k) == "table" then
    for _, x in ipairs(k) do f[x] = (f[x] or 0) + 1 end
  else
    f[k] = (f[k] or 0) + 1
  end
  return k
end

-- Due again: the messages set aside for key, while it has room. With keep,
-- the first is returned instead, for the worker whose attempt just ended
-- (no trip through the heap and no other worker woken for it).
local function release(self, key, keep)
  local l = self.aside[key]
  if not l then return nil end
  local room = self.per_destination - (self.flight[key] or 0)
  local kept
  local list = l.list
  local m = fifo.peek(list)
  while m ~= nil do
    if self.aside_of[m] then
      if room <= 0 then break end
      unset_aside(self, m)
      room = room - 1
      if keep and not kept then
        kept = m
      else
        heap_push(self.heap, m)
        poke(self)
      end
    end
    fifo.pop(list)
    m = fifo.peek(list)
  end
  if fifo.len(list) == 0 then self.aside[key] = nil end
  return kept
end

local function give_one(self, key, keep)
  local f = self.flight
  local n = (f[key] or 1) - 1
  f[key] = n > 0 and n or nil
  return release(self, key, keep)
end

-- give_slots(keys) -> a message set aside that is the caller's to attempt next, or nil
function give_slots(self, keys)
  if keys == nil then return nil end
  if type(keys) == "table" then
    local kept
    for _, x in ipairs(keys) do kept = give_one(self, x, not kept) or kept end
    return kept
  end
  return give_one(self, keys, true)
end

-- the messages set aside while their queues have room (a reload that raised
-- per_destination)
local function release_all(self)
  for key in pairs(self.aside) do release(self, key) end
end

-- A fixed set of workers (concurrency of them) takes due messages from the
-- heap: no task is created per delivery.
local function worker(self, i)
  local me = sched.current()
  -- a worker past the concurrency (lowered by a reload) ends
  local next_m -- a message set aside, handed on by the attempt that ended
  while not self.stopped and i <= self.concurrency do
    local h = self.heap
    local m = next_m or h[1]
    if next_m or (m and m[NEXT] <= wall()) then
      if next_m then next_m = nil else heap_pop(h) end
      if self.spool:get(m[ID]) == m and not set_aside(self, m) then
        local keys = take_slots(self, m)
        self.running = self.running + 1
        local ok, err = xpcall(deliver, debug.traceback, self, m)
        if not ok then
          log.error("queue: %s: %s", ids.hex(m[ID]), tostring(err))
          ok, err = xpcall(failed_attempt, debug.traceback, self, m)
          if not ok then log.error("queue: %s: %s", ids.hex(m[ID]), tostring(err)) end
        end
        self.running = self.running - 1
        next_m = give_slots(self, keys)
        local more = self.relabeled[m]
        if more then
          self.relabeled[m] = nil
          local other = give_slots(self, more)
          if other then
            if next_m then
              heap_push(h, next_m)
              poke(self)
            end
            next_m = other
          end
        end
      end
    else
      local idle = self.idle
      idle[#idle + 1] = me
      sched.wait(m and max(0.05, min(1, m[NEXT] - wall())) or 1)
      for k = #idle, 1, -1 do
        if idle[k] == me then table.remove(idle, k) break end
      end
    end
  end
  -- stopped (or past the concurrency) with one handed on: back to the heap
  if next_m then
    heap_push(self.heap, next_m)
    if not self.stopped then poke(self) end
  end
  if self.workers[i] == me then self.workers[i] = nil end
end

function Queue:start()
  if not self.transport then
    log.warn("queue: no transport configured: messages stay in the spool")
    return
  end
  if not self.stopped then return end
  self.stopped = false
  self:spawn_workers()
  arm_wakes(self)
end

-- Workers 1..concurrency, those not running (worker i is workers[i]).
function Queue:spawn_workers()
  local workers = self.workers
  for i = 1, self.concurrency do
    if not workers[i] then
      workers[i] = sched.spawn_named("queue worker " .. i, function(err)
        workers[i] = nil
        log.error("queue worker failed: %s", tostring(err))
      end, worker, self, i)
      -- a worker that ended at once (stop() meanwhile) is not running
      if workers[i] and workers[i].done then workers[i] = nil end
    end
  end
end

-- configure(opts): the options of a reloaded policy (those of new():
-- concurrency, retry, max_age, delay_warning, domains, classify,
-- describe_class). Messages keep their next attempt time; the new retry
-- intervals apply from their next deferral.
function Queue:configure(opts)
  self.concurrency = opts.concurrency or self.concurrency
  self.per_destination = opts.per_destination or self.per_destination
  self.retry = opts.retry or self.retry
  self.max_age = opts.max_age or self.max_age
  self.delay_warning = opts.delay_warning
  self.domain_opts = opts.domains or {}
  self.classify = opts.classify
  self.describe_class = opts.describe_class
  release_all(self)
  if not self.stopped then
    self:spawn_workers()
    -- workers past the new concurrency look at it when woken
    poke(self, true)
  end
end

function Queue:stop()
  self.stopped = true
  -- held messages stay held; their wake times wait for a start()
  arm_wakes(self)
  poke(self, true)
end

-- expedite(list): these messages (spool entries) are due now: moved to the
-- front of the heap, taken back from the gate or suspension that holds
-- them, or, in the middle of an attempt, due again as soon as it ends.
-- (moonpost.admin's purge: its delivery filter then bounces them.)
function Queue:expedite(list)
  local want, moved = {}, false
  for _, m in ipairs(list) do want[m] = true end
  local now, h = wall(), self.heap
  for i = 1, #h do
    local m = h[i]
    if want[m] then
      want[m] = nil
      if m[NEXT] > now then
        m[NEXT] = now
        moved = true
      end
    end
  end
  if moved then heapify(h) end
  for m in pairs(want) do
    if m.rnext then m.rnext = nil end
    local resume = self.parked[m]
    if unset_aside(self, m) then
      if m[NEXT] > now then m[NEXT] = now end
      self.unhold[m] = true
      heap_push(h, m)
    elseif resume then
      resume()
    elseif self.spool:get(m[ID]) == m then
      self.rush[m] = true
    end
  end
  poke(self, true)
end

-- latency() -> { n, p50, p99, max } in seconds, from the 250 to the start
-- of the first delivery attempt, over the last samples
function Queue:latency_stats()
  local l = {}
  for i, v in ipairs(self.latency) do l[i] = v end
  table.sort(l)
  local n = #l
  if n == 0 then return { n = 0 } end
  local function q(p) return l[math.max(1, math.ceil(p * n))] end
  return { n = self.nlatency, p50 = q(0.5), p99 = q(0.99), max = l[n] }
end

function Queue:depth()
  return #self.heap + self.running + self.naside
end

_M.split = split

return _M
