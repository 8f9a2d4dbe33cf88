-- Traffic shaping: the gates a delivery passes before it may use a
-- connection.
--
--   local sh = shape.new(spec)             -- spec checked by moonpost.shape
--   local ticket, gate, at = sh:admit(keys) -- keys: { ready = ..., tenant = ..., source = ... }
--   ...deliver...
--   sh:release(ticket)
--   sh:observe(ready_key, res)             -- response-driven rules
--
-- A gate is the state of one shaping key: the ready queue (source x
-- destination site), the tenant, or the source address. Each has token
-- buckets (messages per second/minute/hour/day), a connection cap, and the
-- temporary modes the response rules set (suspended, slowed, bouncing).
-- admit() takes a token and a connection slot from every gate at once, or
-- from none: a delivery that may not go yet is parked on the gate that
-- stopped it with park(), and the gate hands it back (calls its function)
-- when it may try again. Nothing here waits: the queue's workers stay free
-- for other destinations while one is throttled.
local uv = require "luv"
local sched = require "moonpost.runtime.sched"
local log = require "moonpost.runtime.log"
local buckets = require "moonpost.runtime.bucket"
local dns = require "moonpost.runtime.dns"

local floor, min, max, huge = math.floor, math.min, math.max, math.huge
local lower = string.lower

local _M = { _VERSION = "0.1" }

local function now()
  return uv.now() / 1000
end

-- ---- token buckets ------------------------------------------------------------------

-- rate: { n = messages, per = seconds, burst = tokens or nil }
local function bucket(rate, t)
  local r = rate.n / rate.per
  -- the default burst is a tenth of a second's worth: a limit holds over
  -- any window longer than that, and an hourly or daily limit is spread out
  return buckets.new(r, rate.burst or max(1, r * 0.1), t)
end

local refill = buckets.refill

-- ---- gates ------------------------------------------------------------------------------

local Gate = {}
local gate_mt = { __index = Gate }

local function new_gate(name, limits, t)
  local g = setmetatable({
    name = name,
    limits = limits,
    buckets = {},
    max_conn = limits.max_connections or huge,
    inflight = 0,
    parked = {}, phead = 1, ptail = 0, -- FIFO of functions
    suspended_until = 0,
    slow_until = 0, slow = nil,
    bounce_until = 0, bounce_res = nil,
    stats = { admitted = 0, parked = 0, suspended = 0, slowed = 0, bounced = 0 },
  }, gate_mt)
  for i, rate in ipairs(limits.rates or {}) do g.buckets[i] = bucket(rate, t) end
  return g
end

-- may(t) -> true | false, retry_at (nil: when a connection is released)
function Gate:may(t)
  if t < self.suspended_until then return false, self.suspended_until end
  if self.inflight >= self.max_conn then return false, nil end
  -- slowed: the slow rate, and the gate's own rates still (a slow rule
  -- never lets a destination go faster than its limits)
  if t < self.slow_until then
    local tok = refill(self.slow, t)
    if tok < 1 then return false, t + (1 - tok) / self.slow.r end
  end
  for _, b in ipairs(self.buckets) do
    local tok = refill(b, t)
    if tok < 1 then return false, t + (1 - tok) / b.r end
  end
  return true
end

function Gate:take(t)
  self.inflight = self.inflight + 1
  self.stats.admitted = self.stats.admitted + 1
  if t < self.slow_until then self.slow.tokens = self.slow.tokens - 1 end
  for _, b in ipairs(self.buckets) do b.tokens = b.tokens - 1 end
end

function Gate:parked_count()
  return self.ptail - self.phead + 1
end

-- ---- the shaper ---------------------------------------------------------------------------

local Shaper = {}
local mt = { __index = Shaper }

-- spec: { default = limits, destinations = { {name, limits, domains, mx, rules} },
--         tenants = { name = limits }, sources = { ip = limits }, rules = { rule } }
-- limits: { max_connections, max_messages_per_connection, rates = { {n, per, burst} } }
-- rule: { pattern (Lua pattern) or re (moonpost.runtime.regex), matched on
--         "code enhanced text", text (as written), action =
--         "suspend" | "slow" | "bounce", duration (s), rate (for slow) }
function _M.new(spec)
  return setmetatable({
    spec = spec,
    gates = {},          -- key -> gate
    waking = {},         -- gates with parked work, to look at
    ticker = nil,
  }, mt)
end

-- destination(domain, mx_names) -> the destination entry that matches
-- (by domain, then by MX host suffix), or nil
-- site: the MX set's key (route.smtp's "mx:..."): the answer for a set of
-- MX names is kept, so the suffixes are scanned once per MX set, not per
-- delivery.
function Shaper:destination(domain, mx_names, site)
  local spec = self.spec
  -- by_domain is keyed by A-labels in lower case (moonpost.shape)
  local d = spec.by_domain and spec.by_domain[dns.to_ascii(domain) or lower(domain)]
  if d then return d end
  if not mx_names then return nil end
  local memo = self.by_site
  if site and memo and memo[site] ~= nil then return memo[site] or nil end
  local found = false
  for _, entry in ipairs(spec.destinations or {}) do
    for _, suffix in ipairs(entry.mx or {}) do
      for _, name in ipairs(mx_names) do
        local n = name:lower()
        if n == suffix or (#n > #suffix and n:sub(-#suffix - 1) == "." .. suffix) then
          found = entry
          break
        end
      end
      if found then break end
    end
    if found then break end
  end
  if site then
    memo = memo or {}
    self.by_site = memo
    memo[site] = found
  end
  return found or nil
end

-- What a gate of the shaper before a reload knew that still holds: the
-- modes the response rules set (suspended, slowed, bouncing), and the
-- tokens of a rate that did not change.
local function carry(g, old, t)
  if old.suspended_until > t then g.suspended_until = old.suspended_until end
  if old.slow_until > t then g.slow_until, g.slow = old.slow_until, old.slow end
  if old.bounce_until > t then g.bounce_until, g.bounce_res = old.bounce_until, old.bounce_res end
  for i, b in ipairs(g.buckets) do
    local ob = old.buckets[i]
    if ob and ob.r == b.r and ob.cap == b.cap then
      b.tokens, b.t = ob.tokens, ob.t
    end
  end
end

function Shaper:gate(key, limits, max_conn)
  local g = self.gates[key]
  if not g then
    local t = now()
    g = new_gate(key, limits, t)
    if not limits.max_connections and max_conn then g.max_conn = max_conn end
    g.shaper = self
    local old = self.inherited and self.inherited[key]
    if old then carry(g, old, t) end
    self.gates[key] = g
  end
  return g
end

-- inherit(old): a reloaded policy's shaper takes over what the gates of
-- the one before know (see carry()), as it makes its gates. Connections
-- in flight under the old one are not counted here.
function Shaper:inherit(old)
  local list = {}
  for key, g in pairs(old.inherited or {}) do list[key] = g end
  for key, g in pairs(old.gates) do list[key] = g end
  self.inherited = list
end

-- gates_for(ctx) -> list of gates. ctx: { ready = key, dest = entry | nil,
-- tenant = name | nil, source = ip | nil }
function Shaper:gates_for(ctx)
  local spec = self.spec
  local list = { self:gate("ready:" .. ctx.ready, ctx.dest and ctx.dest.limits or spec.default or {},
    ctx.max_connections) }
  local tl = ctx.tenant and spec.tenants and spec.tenants[ctx.tenant]
  if tl then list[#list + 1] = self:gate("tenant:" .. ctx.tenant, tl) end
  local sl = ctx.source and spec.sources and spec.sources[ctx.source]
  if sl then list[#list + 1] = self:gate("source:" .. ctx.source, sl) end
  return list
end

-- admit(gates) -> ticket | nil, gate, retry_at | "bounce", res
function Shaper.admit(_, gates)
  local t = now()
  local ready = gates[1]
  if t < ready.bounce_until then
    ready.stats.bounced = ready.stats.bounced + 1
    return nil, "bounce", ready.bounce_res
  end
  for _, g in ipairs(gates) do
    local ok, at = g:may(t)
    if not ok then return nil, g, at end
  end
  for _, g in ipairs(gates) do g:take(t) end
  return gates
end

function Shaper:release(ticket)
  for _, g in ipairs(ticket) do
    g.inflight = g.inflight - 1
    if g.ptail >= g.phead then self:kick(g) end
  end
end

-- park(gate, fn, retry_at): fn() is called when the gate may admit again.
function Shaper:park(g, fn, at)
  -- stopped (a reload replaced it): back to the queue at once
  if self.stopped then return fn() end
  g.ptail = g.ptail + 1
  g.parked[g.ptail] = fn
  g.stats.parked = g.stats.parked + 1
  if at and (not g.retry_at or at < g.retry_at) then g.retry_at = at end
  self:kick(g)
end

-- The release task: hands parked deliveries back as their gates open, as
-- many as each gate can take now.
local function run(self)
  local me = sched.current()
  while next(self.waking) and not self.stopped do
    local t = now()
    local soonest = huge
    for g in pairs(self.waking) do
      local n = g:parked_count()
      if n <= 0 then
        self.waking[g] = nil
      else
        -- how many can go: the connection slots and whole tokens free now
        local ok, at = g:may(t)
        if ok then
          local room = g.max_conn - g.inflight
          local b = t < g.slow_until and g.slow or nil
          local tokens = huge
          if b then
            tokens = floor(b.tokens)
          else
            for _, bk in ipairs(g.buckets) do tokens = min(tokens, floor(bk.tokens)) end
          end
          local go = min(n, room, max(1, tokens))
          for _ = 1, go do
            local fn = g.parked[g.phead]
            g.parked[g.phead] = nil
            g.phead = g.phead + 1
            fn()
          end
          if g:parked_count() <= 0 then
            g.phead, g.ptail = 1, 0
            self.waking[g] = nil
          else
            -- the rest wait for the next tokens (or a released connection)
            soonest = min(soonest, t + 0.025)
          end
        elseif at then
          soonest = min(soonest, at)
        end
      end
    end
    if not next(self.waking) then break end
    self.task = me
    sched.wait(soonest < huge and max(0.005, soonest - t) or 1)
    self.task = nil
  end
  self.ticker = nil
end

function Shaper:kick(g)
  self.waking[g] = true
  if self.stopped then return end
  if self.task then
    sched.wake(self.task)
  elseif not self.ticker then
    -- set before spawning: the task runs at once, and may end before
    -- spawn returns (it clears the flag as it ends)
    self.ticker = true
    sched.spawn_named("shape", function(err)
      self.ticker, self.task = nil, nil
      log.error("shape: %s", tostring(err))
    end, run, self)
  end
end

-- stop(): no more releases. The deliveries parked on the gates are handed
-- back (their functions called): after a reload they go to the next
-- shaper; when the queue has stopped they stay in the spool.
function Shaper:stop()
  self.stopped = true
  if self.task then sched.wake(self.task) end
  for _, g in pairs(self.gates) do
    while g.phead <= g.ptail do
      local fn = g.parked[g.phead]
      g.parked[g.phead] = nil
      g.phead = g.phead + 1
      local ok, err = pcall(fn)
      if not ok then log.error("shape: %s: %s", g.name, tostring(err)) end
    end
    g.phead, g.ptail = 1, 0
  end
  self.waking = {}
end

-- ---- response-driven rules --------------------------------------------------------------

local function reply_line(res)
  return (res.code and (res.code .. " ") or "") .. (res.enhanced and (res.enhanced .. " ") or "")
    .. tostring(res.text or "")
end

-- observe(gates, dest, res) -> res: runs the rules of the destination, then
-- the global ones, on one remote reply. The first match applies its action
-- to the ready queue (gates[1]) for its duration; a bounce rule turns the
-- result into a permanent failure.
function Shaper:observe(gates, dest, res)
  if res.status == "delivered" then return res end
  local line = reply_line(res)
  -- (not ipairs over { dest and dest.rules, ... }: without a destination
  -- the first item is nil and the global rules would never run)
  for _, rules in ipairs({ dest and dest.rules or false, self.spec.rules or false }) do
    for _, rule in ipairs(rules or {}) do
      local hit
      if rule.re then hit = rule.re:find(line) else hit = line:find(rule.pattern) end
      if hit then
        return self:apply(gates[1], rule, res, line)
      end
    end
  end
  return res
end

function Shaper:apply(g, rule, res, line)
  local t = now()
  local dur = rule.duration or 0
  if rule.action == "suspend" then
    if t >= g.suspended_until then
      g.stats.suspended = g.stats.suspended + 1
      log.warn("shape: %s suspended for %gs: %s", g.name, dur, line)
    end
    g.suspended_until = max(g.suspended_until, t + dur)
    self:kick(g)
  elseif rule.action == "slow" then
    if t >= g.slow_until then
      g.stats.slowed = g.stats.slowed + 1
      g.slow = bucket(rule.rate, t)
      log.warn("shape: %s slowed to %g/%gs for %gs: %s", g.name, rule.rate.n, rule.rate.per, dur, line)
    end
    g.slow_until = max(g.slow_until, t + dur)
  elseif rule.action == "bounce" then
    local b = { status = "bounced", code = res.code and res.code >= 500 and res.code or 550,
      enhanced = res.enhanced and res.enhanced:gsub("^4", "5") or "5.0.0", text = res.text, host = res.host,
      stage = res.stage, rule = rule.text }
    if dur > 0 then
      g.bounce_until = max(g.bounce_until, t + dur)
      g.bounce_res = b
      log.warn("shape: %s bounces its mail for %gs: %s", g.name, dur, line)
    end
    return b
  end
  -- suspend, slow: the reply is about the sending, not the message (a 5xx
  -- from Microsoft's S3150 or Yahoo's TSS09 too): it is deferred, and
  -- retried once the mode allows
  if res.status == "bounced" then
    return { status = "deferred", code = 451, enhanced = res.enhanced and res.enhanced:gsub("^5", "4") or "4.7.0",
      text = res.text, host = res.host, stage = res.stage, rule = rule.text }
  end
  return res
end

-- state() -> { key = { inflight, parked, suspended_for, slowed_for, bouncing_for, stats } }
function Shaper:state()
  local out, t = {}, now()
  for key, g in pairs(self.gates) do
    out[key] = { inflight = g.inflight, parked = g:parked_count(), max_connections = g.max_conn,
      suspended_for = max(0, g.suspended_until - t), slowed_for = max(0, g.slow_until - t),
      bouncing_for = max(0, g.bounce_until - t), stats = g.stats }
  end
  return out
end

return _M
