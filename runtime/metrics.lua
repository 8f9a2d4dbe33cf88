-- Metrics: counters, gauges and histograms with labels, rendered in the
-- Prometheus text exposition format (version 0.0.4).
--
--   local metrics = require "moonpost.runtime.metrics"
--   local reg = metrics.new { prefix = "moonpost", caps = { tenant = 100, domain = 200 } }
--   local sent = reg:counter("messages_delivered_total", "Recipients delivered", { "tenant", "domain" })
--   sent:inc("acme", "example.com")             -- a lookup in nested tables and an add
--   local lat = reg:histogram("delivery_latency_seconds", "250 to remote 250", { "tenant" })
--   lat:observe(0.25, "acme")
--   local open = reg:gauge("connections_open", "Open connections", { "direction" }):child("in")
--   open:inc(); open:dec()                      -- a child: no lookup at all
--   reg:collect(function() depth:clear(); depth:set(7, "acme", "example.com") end) -- before each render
--   local text = reg:render()
--
-- Families are registered by their suffix and rendered as <prefix>_<suffix>,
-- so one set of instruments serves any naming ("moonpost_messages_total",
-- "postmta_messages_total"); a family registered with { raw = true } keeps
-- its name (process_start_time_seconds).
--
-- Label cardinality is capped for the labels named in `caps` (tenant,
-- domain): a family keeps at most that many distinct values of such a label,
-- and folds the rest into the value "other", so the number of series stays
-- bounded whatever the traffic.
--   * Counters and histograms (flows) keep the busiest values, by a top-K
--     scheme with hysteresis: the first K values seen are tracked, with a
--     count of their increments. A value past them goes to "other" and is
--     counted in a bounded table of candidates (when it is full, every
--     candidate's count is halved and the zeros leave, so a long tail of
--     one-off values stays cheap and never promotes). A candidate whose count
--     grows past twice the quietest tracked value's (plus one) takes its
--     place: the quietest value's series are added into the "other" series
--     (so every sum stays exact and counters never go down) and the
--     candidate's series start from there. Tracked counts are halved every
--     `half_life` seconds, so a value that went quiet can be replaced.
--   * Gauges are states: at each render the K values with the largest
--     (absolute) totals keep their series and the rest are summed into
--     "other".
-- A real label value "other" shares the series of the folded ones.
local uv = require "luv"
local log = require "moonpost.runtime.log"

local type, tostring, pairs, ipairs, setmetatable, error = type, tostring, pairs, ipairs, setmetatable, error
local format, gsub, find, concat, sort = string.format, string.gsub, string.find, table.concat, table.sort
local floor, huge, abs = math.floor, math.huge, math.abs
local pcall, xpcall, traceback, next, tonumber = pcall, xpcall, debug.traceback, next, tonumber

local _M = { _VERSION = "0.1" }

_M.OTHER = "other"
_M.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
-- seconds: from 10 ms (a relay on the same machine) to a day of retries
_M.DEFAULT_BUCKETS = { 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400 }
_M.DEFAULT_HALF_LIFE = 600

local OTHER = _M.OTHER
local MAX_LABELS = 4

-- ---- the text format --------------------------------------------------------------

local function valid_name(s)
  return type(s) == "string" and find(s, "^[%a_:][%w_:]*$") ~= nil
end

local function valid_label(s)
  return type(s) == "string" and find(s, "^[%a_][%w_]*$") ~= nil and not find(s, "^__")
end

local LABEL_ESCAPES = { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }
local HELP_ESCAPES = { ["\\"] = "\\\\", ["\n"] = "\\n" }

local function escape_label(v)
  return (gsub(v, '[\\"\n]', LABEL_ESCAPES))
end
_M.escape_label = escape_label

local function escape_help(s)
  return (gsub(s, "[\\\n]", HELP_ESCAPES))
end

-- A sample value: integers as such, other numbers exactly (%.17g only when
-- the short form would not read back the same), and the special values.
local function number(v)
  if v ~= v then return "NaN" end
  if v == huge then return "+Inf" end
  if v == -huge then return "-Inf" end
  if v == floor(v) and abs(v) < 2 ^ 53 then return format("%d", v) end
  local s = format("%.15g", v)
  if tonumber(s) ~= v then s = format("%.17g", v) end
  return s
end
_M.number = number

-- ---- label caps -------------------------------------------------------------------------

local Cap = {}
local cap_mt = { __index = Cap }

local function new_cap(family, pos, k, half_life)
  return setmetatable({
    family = family, pos = pos, k = k, half_life = half_life,
    tracked = {}, ntracked = 0,   -- value -> count of increments (halved every half_life)
    cand = {}, ncand = 0,         -- value -> recent count, for values folded into "other"
    min = 0,                      -- a lower bound of the smallest tracked count
    decayed_at = uv.now(),
    promotions = 0,
  }, cap_mt)
end

local function halve(t, drop)
  local n = 0
  for v, c in pairs(t) do
    c = floor(c / 2)
    if c == 0 and drop then t[v] = nil else
      t[v] = c
      n = n + 1
    end
  end
  return n
end

local fold -- (family, pos, value): the family's series of value go into "other"

-- The slow path of map(): a value that is not tracked.
local function admit(self, v)
  if v == OTHER then return OTHER end
  local tracked = self.tracked
  if self.ntracked < self.k then
    tracked[v] = 1
    self.ntracked = self.ntracked + 1
    return v
  end
  local now = uv.now()
  if now - self.decayed_at >= self.half_life * 1000 then
    self.decayed_at = now
    halve(tracked, false)
    self.min = floor(self.min / 2)
  end
  local cand = self.cand
  local c = cand[v]
  if not c then
    if self.ncand >= self.k then self.ncand = halve(cand, true) end
    self.ncand = self.ncand + 1
    c = 0
  end
  c = c + 1
  cand[v] = c
  if c <= 2 * self.min + 1 then return OTHER end
  -- the bound says it may outgrow the quietest: find that one
  local qv, qc = nil, huge
  for tv, tc in pairs(tracked) do
    if tc < qc then qv, qc = tv, tc end
  end
  self.min = qc
  if c <= 2 * qc + 1 then return OTHER end
  tracked[qv] = nil
  cand[v] = nil
  self.ncand = self.ncand - 1
  tracked[v] = c
  self.promotions = self.promotions + 1
  fold(self.family, self.pos, qv)
  return v
end

-- map(v) -> v, or "other" when v is past the cap. The hot path is one
-- lookup and one add.
function Cap:map(v)
  local tracked = self.tracked
  local c = tracked[v]
  if c then
    tracked[v] = c + 1
    return v
  end
  return admit(self, v)
end

-- ---- families ---------------------------------------------------------------------------

local Family = {}

local Counter = setmetatable({}, { __index = Family })
local Gauge = setmetatable({}, { __index = Family })
local Histogram = setmetatable({}, { __index = Family })

local CounterChild, GaugeChild, HistogramChild = {}, {}, {}
local child_mt = {
  counter = { __index = CounterChild },
  gauge = { __index = GaugeChild },
  histogram = { __index = HistogramChild },
}

function CounterChild:inc() self.value = self.value + 1 end
function CounterChild:add(n) self.value = self.value + n end
function CounterChild:set(v) self.value = v end

function GaugeChild:inc() self.value = self.value + 1 end
function GaugeChild:dec() self.value = self.value - 1 end
function GaugeChild:add(n) self.value = self.value + n end
function GaugeChild:set(v) self.value = v end

-- observe(v): buckets are searched from the smallest; counts are kept per
-- bucket and made cumulative when rendered.
function HistogramChild:observe(v)
  local bounds, counts = self.bounds, self.counts
  local i, n = 1, #bounds
  while i <= n and v > bounds[i] do i = i + 1 end
  counts[i] = counts[i] + 1
  self.sum = self.sum + v
  self.count = self.count + 1
end

local function label_key(names, values)
  local parts = {}
  for i = 1, #names do parts[i] = names[i] .. '="' .. escape_label(values[i]) .. '"' end
  return concat(parts, ",")
end

local function new_child(self, values)
  local ch = { labels = values, key = label_key(self.labels, values) }
  if self.type == "histogram" then
    local counts = {}
    for i = 1, #self.buckets + 1 do counts[i] = 0 end
    ch.bounds, ch.counts, ch.sum, ch.count = self.buckets, counts, 0, 0
  else
    ch.value = 0
  end
  setmetatable(ch, child_mt[self.type])
  self.list[#self.list + 1] = ch
  return ch
end

-- Enter a child in the nested index, one table level per label.
local function index_child(self, ch)
  local values, n = ch.labels, self.n
  local t = self.index
  for i = 1, n - 1 do
    local v = values[i]
    local nt = t[v]
    if not nt then
      nt = {}
      t[v] = nt
    end
    t = nt
  end
  t[values[n]] = ch
end

-- create(self, a, b, c, d): a child for these (already mapped) values,
-- entered in the list and the nested index.
local function create(self, a, b, c, d)
  local values = { a, b, c, d }
  for i = self.n + 1, MAX_LABELS do values[i] = nil end
  local ch = new_child(self, values)
  index_child(self, ch)
  return ch
end

local function label(self, i, v)
  if type(v) ~= "string" then v = v == nil and "" or tostring(v) end
  local cap = self.caps[i]
  if cap then v = cap:map(v) end
  return v
end

-- lookup(self, a, b, c, d) -> the child for these label values. Nested
-- tables, one level per label: no key string is built per call.
local function lookup(self, a, b, c, d)
  local n = self.n
  if n == 0 then return self.root end
  a = label(self, 1, a)
  if n > 1 then
    b = label(self, 2, b)
    if n > 2 then
      c = label(self, 3, c)
      if n > 3 then d = label(self, 4, d) end
    end
  end
  local t = self.index[a]
  if n == 1 then return t or create(self, a) end
  t = t and t[b]
  if n == 2 then return t or create(self, a, b) end
  t = t and t[c]
  if n == 3 then return t or create(self, a, b, c) end
  t = t and t[d]
  return t or create(self, a, b, c, d)
end

local function merge(into, from)
  if from.counts then
    for i, n in ipairs(from.counts) do into.counts[i] = into.counts[i] + n end
    into.sum = into.sum + from.sum
    into.count = into.count + from.count
  else
    into.value = into.value + from.value
  end
end

-- Put an existing child back into the list and the nested index.
local function insert(self, ch)
  index_child(self, ch)
  self.list[#self.list + 1] = ch
end

local function find_child(self, values)
  local t = self.index
  for i = 1, self.n do
    t = t[values[i]]
    if not t then return nil end
  end
  return t
end

-- fold: every series with `value` at label `pos` is added into the series
-- with "other" there, and removed. Runs when a cap promotes a value: rare.
function fold(self, pos, value)
  local keep, gone = {}, {}
  for _, ch in ipairs(self.list) do
    if ch.labels[pos] == value then gone[#gone + 1] = ch else keep[#keep + 1] = ch end
  end
  if #gone == 0 then return end
  self.list, self.index = {}, {}
  for _, ch in ipairs(keep) do insert(self, ch) end
  for _, ch in ipairs(gone) do
    local values = { ch.labels[1], ch.labels[2], ch.labels[3], ch.labels[4] }
    values[pos] = OTHER
    merge(find_child(self, values) or create(self, values[1], values[2], values[3], values[4]), ch)
  end
  self.folded = (self.folded or 0) + #gone
end

-- child(a, b, ...) -> the series for these label values, to keep and
-- update without a lookup. Not for families with capped labels (a series
-- may be folded into "other" later; use the family's methods there).
function Family:child(a, b, c, d)
  if self.capped then
    error(format("metrics: %s: child() of a family with capped labels", self.suffix), 2)
  end
  return lookup(self, a, b, c, d)
end

-- clear(): forget every series (a gauge refilled by a collect function).
function Family:clear()
  self.list = {}
  self.index = {}
  if self.n == 0 then self.root = new_child(self, {}) end
end

function Counter:inc(a, b, c, d)
  local ch = lookup(self, a, b, c, d)
  ch.value = ch.value + 1
end

function Counter:add(n, a, b, c, d)
  local ch = lookup(self, a, b, c, d)
  ch.value = ch.value + n
end

-- set(v, ...): for collect functions that copy a total kept elsewhere.
function Counter:set(v, a, b, c, d)
  lookup(self, a, b, c, d).value = v
end

Gauge.set = Counter.set
Gauge.inc = Counter.inc
Gauge.add = Counter.add

function Gauge:dec(a, b, c, d)
  local ch = lookup(self, a, b, c, d)
  ch.value = ch.value - 1
end

function Histogram:observe(v, a, b, c, d)
  lookup(self, a, b, c, d):observe(v)
end

-- ---- the registry -----------------------------------------------------------------------

local Registry = {}
local registry_mt = { __index = Registry }

local KINDS = { counter = Counter, gauge = Gauge, histogram = Histogram }

local function check_buckets(b, where)
  if type(b) ~= "table" or #b == 0 then error(where .. ": expected a list of numbers", 3) end
  local out = {}
  for i, v in ipairs(b) do
    if type(v) ~= "number" or v ~= v then error(format("%s: item %d: expected a number", where, i), 3) end
    if i > 1 and v <= out[i - 1] then
      error(format("%s: expected increasing numbers (%s after %s)", where, number(v), number(out[i - 1])), 3)
    end
    out[i] = v
  end
  if out[#out] == huge then out[#out] = nil end -- +Inf is always there
  return out
end
_M.check_buckets = function(b, where) return check_buckets(b, where or "metrics: buckets") end

local function check_prefix(p)
  if p ~= "" and not valid_name(p) then
    error(format("metrics: prefix %q is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)", tostring(p)), 3)
  end
  return p
end

local function same_buckets(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do
    if a[i] ~= b[i] then return false end
  end
  return true
end

-- new{ prefix = "moonpost", caps = { tenant = 100, domain = 200 },
--      buckets = {...}, half_life = 600, inherit = registry }
-- inherit: the registry of the MTA a reload replaces. A family registered
-- again with the same type, labels (and buckets) is that registry's family,
-- so counters and histograms go on from their values and never reset; until
-- settle(), that is (see below).
function _M.new(opts)
  opts = opts or {}
  return setmetatable({
    inherit = opts.inherit,
    prefix = check_prefix(opts.prefix or "moonpost"),
    caps = opts.caps or {},
    buckets = opts.buckets and check_buckets(opts.buckets, "metrics: buckets") or _M.DEFAULT_BUCKETS,
    half_life = opts.half_life or _M.DEFAULT_HALF_LIFE,
    families = {},       -- in registration order
    by_name = {},
    collectors = {},
  }, registry_mt)
end

-- configure{ prefix, caps, buckets, half_life }: changes what later
-- renders use; a histogram with the registry's default buckets takes the new
-- ones (its series start over, so configure before counting).
function Registry:configure(opts)
  if opts.prefix ~= nil then self.prefix = check_prefix(opts.prefix) end
  if opts.half_life ~= nil then self.half_life = opts.half_life end
  if opts.caps then
    for k, v in pairs(opts.caps) do self.caps[k] = v end
  end
  if opts.buckets then self.buckets = check_buckets(opts.buckets, "metrics: buckets") end
  for _, f in ipairs(self.families) do
    for i, name in ipairs(f.labels) do
      local cap = f.caps[i]
      if cap then
        cap.k = self.caps[name] or cap.k
        cap.half_life = self.half_life
      end
    end
    if f.type == "histogram" and f.default_buckets and opts.buckets and not same_buckets(f.buckets, self.buckets) then
      f.buckets = self.buckets
      f:clear()
    end
  end
end

-- settle(): a reload has committed. Inherited histograms on the registry's
-- default buckets take this registry's (their series start over only when
-- the buckets changed), and the old registry is let go.
function Registry:settle()
  for _, f in ipairs(self.families) do
    if f.type == "histogram" and f.default_buckets and not same_buckets(f.buckets, self.buckets) then
      f.buckets = self.buckets
      f:clear()
    end
  end
  self.inherit = nil
end

local function register(self, kind, name, help, labels, opts)
  opts = opts or {}
  if not valid_name(name) then error(format("metrics: %q is not a metric name", tostring(name)), 3) end
  labels = labels or {}
  if #labels > MAX_LABELS then error(format("metrics: %s: at most %d labels", name, MAX_LABELS), 3) end
  for _, l in ipairs(labels) do
    if not valid_label(l) or (kind == "histogram" and l == "le") then
      error(format("metrics: %s: %q is not a label name", name, tostring(l)), 3)
    end
  end
  local old = self.by_name[name]
  if not old and self.inherit then
    -- a reload: the family of the registry this one replaces carries on
    -- (its series, its caps, and the children the old policy still counts
    -- in), when it is the same instrument
    local f = self.inherit.by_name[name]
    if f and f.type == kind and concat(f.labels, ",") == concat(labels, ",") and f.raw == (opts.raw or false)
        and (kind ~= "histogram" or (opts.buckets == nil and f.default_buckets)
          or (opts.buckets ~= nil and not f.default_buckets
            and same_buckets(f.buckets, check_buckets(opts.buckets, "metrics: " .. name .. ": buckets")))) then
      f.help = help or name
      self.families[#self.families + 1] = f
      self.by_name[name] = f
      return f
    end
  end
  if old then
    if old.type ~= kind or concat(old.labels, ",") ~= concat(labels, ",") then
      error(format("metrics: %s is already registered as a %s with labels {%s}", name, old.type,
        concat(old.labels, ",")), 3)
    end
    return old
  end
  local f = setmetatable({
    suffix = name,
    raw = opts.raw or false,
    help = help or name,
    type = kind,
    labels = labels,
    n = #labels,
    caps = {},
    list = {},
    index = {},
  }, { __index = KINDS[kind] })
  if kind == "histogram" then
    f.default_buckets = opts.buckets == nil
    f.buckets = opts.buckets and check_buckets(opts.buckets, "metrics: " .. name .. ": buckets") or self.buckets
  end
  for i, l in ipairs(labels) do
    local k = self.caps[l]
    if k and kind ~= "gauge" then
      f.caps[i] = new_cap(f, i, k, self.half_life)
      f.capped = true
    elseif k then
      f.capped = true
    end
  end
  if f.n == 0 then f.root = new_child(f, {}) end
  self.families[#self.families + 1] = f
  self.by_name[name] = f
  return f
end

-- counter(name, help, labels, opts) -> family; opts.raw: no prefix
function Registry:counter(name, help, labels, opts) return register(self, "counter", name, help, labels, opts) end
function Registry:gauge(name, help, labels, opts) return register(self, "gauge", name, help, labels, opts) end
-- histogram(name, help, labels, opts): opts.buckets (upper bounds; +Inf is added)
function Registry:histogram(name, help, labels, opts) return register(self, "histogram", name, help, labels, opts) end

function Registry:get(name)
  return self.by_name[name]
end

-- collect(fn): fn(registry) runs before each render, to copy totals kept
-- elsewhere (the spool's stats, the queue's counters) into families.
function Registry:collect(fn)
  self.collectors[#self.collectors + 1] = fn
end

function Registry:name_of(f)
  if f.raw or self.prefix == "" then return f.suffix end
  return self.prefix .. "_" .. f.suffix
end

-- The series of a gauge with capped labels: the largest totals per capped
-- label keep their values, the rest are summed into "other".
local function capped_gauge(self, f)
  local list = f.list
  local keepsets = {}
  for i, name in ipairs(f.labels) do
    local k = self.caps[name]
    if k then
      local totals, values = {}, {}
      for _, ch in ipairs(list) do
        local v = ch.labels[i]
        if totals[v] == nil then values[#values + 1] = v end
        totals[v] = (totals[v] or 0) + abs(ch.value)
      end
      if #values > k then
        sort(values, function(x, y)
          if totals[x] ~= totals[y] then return totals[x] > totals[y] end
          return x < y
        end)
        local keep = {}
        for j = 1, k do if values[j] ~= OTHER then keep[values[j]] = true end end
        keepsets[i] = keep
      end
    end
  end
  if not next(keepsets) then return list end
  local out, by_key = {}, {}
  for _, ch in ipairs(list) do
    local values = {}
    for i = 1, f.n do
      local v = ch.labels[i]
      local keep = keepsets[i]
      values[i] = (keep and not keep[v]) and OTHER or v
    end
    local key = label_key(f.labels, values)
    local dst = by_key[key]
    if dst then
      dst.value = dst.value + ch.value
    else
      dst = { labels = values, key = key, value = ch.value }
      by_key[key] = dst
      out[#out + 1] = dst
    end
  end
  return out
end

local function by_key(a, b) return a.key < b.key end

-- render() -> the exposition text of every family, collect functions first.
function Registry:render()
  for _, fn in ipairs(self.collectors) do
    local ok, err = xpcall(fn, traceback, self)
    if not ok then log.error("metrics: a collect function failed: %s", tostring(err)) end
  end
  local out, n = {}, 0
  local function put(s)
    n = n + 1
    out[n] = s
  end
  for _, f in ipairs(self.families) do
    local name = self:name_of(f)
    put(format("# HELP %s %s\n# TYPE %s %s\n", name, escape_help(f.help), name, f.type))
    local list = f.list
    if f.type == "gauge" and f.capped then list = capped_gauge(self, f) end
    local sorted = {}
    for i, ch in ipairs(list) do sorted[i] = ch end
    sort(sorted, by_key)
    for _, ch in ipairs(sorted) do
      local key = ch.key
      if f.type == "histogram" then
        local pre = key ~= "" and (key .. ",") or ""
        local cum = 0
        for i, b in ipairs(f.buckets) do
          cum = cum + ch.counts[i]
          put(format('%s_bucket{%sle="%s"} %s\n', name, pre, number(b), number(cum)))
        end
        put(format('%s_bucket{%sle="+Inf"} %s\n', name, pre, number(ch.count)))
        local braces = key ~= "" and ("{" .. key .. "}") or ""
        put(format("%s_sum%s %s\n%s_count%s %s\n", name, braces, number(ch.sum), name, braces, number(ch.count)))
      elseif key ~= "" then
        put(format("%s{%s} %s\n", name, key, number(ch.value)))
      else
        put(format("%s %s\n", name, number(ch.value)))
      end
    end
  end
  return concat(out)
end

-- series() -> the number of samples render() would write (for specs and
-- for watching the caps): one per counter or gauge series, buckets + 3 per
-- histogram series.
function Registry:series()
  local total = 0
  for _, f in ipairs(self.families) do
    local list = f.list
    if f.type == "gauge" and f.capped then list = capped_gauge(self, f) end
    total = total + #list * (f.type == "histogram" and (#f.buckets + 3) or 1)
  end
  return total
end

-- handler(req) for an HTTP route: 200, the text, its Content-Type.
function Registry:handler()
  return function()
    local ok, text = pcall(self.render, self)
    if not ok then
      log.error("metrics: render failed: %s", tostring(text))
      return 500, "metrics: render failed\n", { ["Content-Type"] = "text/plain; charset=utf-8" }
    end
    return 200, text, { ["Content-Type"] = _M.CONTENT_TYPE }
  end
end

_M.Family = Family
_M.valid_name = valid_name

return _M
