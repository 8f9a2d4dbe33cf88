-- moonpost.shape: how fast mail leaves, per destination, tenant and source.
--
--   mta:use(require("moonpost.shape").setup {
--     defaults = true,                -- the shipped Gmail/Microsoft/Yahoo/Apple entries
--     default = { max_connections = 20, max_messages_per_connection = 100 },
--     destinations = {
--       example = { domains = { "example.com" }, mx = { "mx.example.net" },
--                   max_connections = 5, rate = { "100/s", "100000/d" },
--                   rules = { { match = "421 4%.7%.0 .*too fast", action = "slow", rate = "10/s",
--                               duration = "10m" } } },
--     },
--     tenants = { acme = { rate = "50/s", max_connections = 10 } },
--     sources = { ["192.0.2.20"] = { rate = "20/s" } },
--     rules = { { match = "spamhaus", action = "suspend", duration = "1h" } },
--   })
--   mta:use(require("moonpost.shape").load "shaping.lua")  -- a file returning that table
--
-- A destination is a site: the domains listed, and every domain whose MX
-- hosts end in one of the mx suffixes, share its limits. The rest is
-- limited per MX set (domains on the same MX hosts share) with `default`.
-- Limits hold per ready queue (source x site); tenant and source limits
-- hold across sites. docs/shape.md has every option.
local config = require "moonpost.runtime.config"
local shape = require "moonpost.runtime.shape"
local dns = require "moonpost.runtime.dns"
local regex = require "moonpost.runtime.regex"

local _M = { _VERSION = "0.1" }

-- "100/s" | "6000/m" | "1000/h" | "50000/d" | "5/10s" -> { n, per }
local function parse_rate(v, where)
  local r = config.rate(v)
  if r then return { n = r.count, per = r.per } end
  config.raise(string.format("%s: expected a rate like \"100/s\", \"6000/m\", \"1000/h\" or \"50000/d\", got %s",
    where, type(v) == "string" and string.format("%q", v) or type(v)))
end
_M.parse_rate = parse_rate

local LIMITS_SCHEMA = {
  max_connections = { type = "posint" },
  max_messages_per_connection = { type = "posint" },
  rate = { type = "any" },
  burst = { type = "number", check = function(v) return v >= 1, "must be at least 1" end },
}

local DEST_SCHEMA = {
  domains = { type = "list" },
  mx = { type = "list" },
  max_connections = { type = "posint" },
  max_messages_per_connection = { type = "posint" },
  rate = { type = "any" },
  burst = { type = "number", check = function(v) return v >= 1, "must be at least 1" end },
  rules = { type = "table" },
}

local RULE_SCHEMA = {
  match = { type = "string" },
  contains = { type = "string" },
  regex = { type = "string" },
  action = { type = "enum", values = { "suspend", "slow", "bounce" }, required = true },
  duration = { type = "duration", default = 0 },
  rate = { type = "any" },
}

local function limits_of(where, o)
  local rates
  if o.rate ~= nil then
    local list = type(o.rate) == "table" and o.rate or { o.rate }
    rates = {}
    for i, r in ipairs(list) do
      rates[i] = parse_rate(r, where .. ": field 'rate'" .. (type(o.rate) == "table" and (" item " .. i) or ""))
      rates[i].burst = o.burst
    end
  end
  return { max_connections = o.max_connections, max_messages_per_connection = o.max_messages_per_connection,
    rates = rates }
end

local function plain(s)
  return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

local function check_rules(list, where)
  if list == nil then return nil end
  if type(list) ~= "table" then config.raise(where .. ": expected a list of rules") end
  local out = {}
  for i, r in ipairs(list) do
    local w = where .. " item " .. i
    local o = config.check(w, r, RULE_SCHEMA)
    local given = (o.match and 1 or 0) + (o.contains and 1 or 0) + (o.regex and 1 or 0)
    if given ~= 1 then
      config.raise(w .. ": give one of 'match' (a Lua pattern), 'regex' (a regular expression) or 'contains' "
        .. "(plain text)")
    end
    local pattern, re
    if o.regex then
      local why
      re, why = regex.compile(o.regex, { icase = true })
      if not re then config.raise(w .. ": field 'regex': " .. tostring(why)) end
    else
      pattern = o.match or plain(o.contains)
      local ok, err = pcall(string.find, "", pattern)
      if not ok then config.raise(w .. ": field 'match': bad pattern: " .. tostring(err)) end
    end
    if o.action == "slow" then
      if o.rate == nil then config.raise(w .. ": action 'slow' needs a rate") end
      o.rate = parse_rate(o.rate, w .. ": field 'rate'")
    elseif o.rate ~= nil then
      config.raise(w .. ": field 'rate' is only for action 'slow'")
    end
    if o.action ~= "bounce" and o.duration <= 0 then
      config.raise(w .. ": action '" .. o.action .. "' needs a duration > 0")
    end
    out[i] = { pattern = pattern, re = re, action = o.action, duration = o.duration, rate = o.rate,
      text = o.match or o.contains or o.regex }
  end
  return out
end

local SCHEMA = {
  defaults = { type = "boolean", default = false },
  default = { type = "table" },
  destinations = { type = "table" },
  tenants = { type = "table" },
  sources = { type = "table" },
  rules = { type = "table" },
}

-- setup(opts) -> block; opts as in the header of this file.
function _M.setup(opts)
  local o = config.check("shape", opts, SCHEMA)
  local spec = { destinations = {}, by_domain = {}, tenants = {}, sources = {} }
  spec.default = limits_of("shape: default", config.check("shape: default", o.default, LIMITS_SCHEMA))
  local entries = {}
  if o.defaults then
    for name, d in pairs(require("moonpost.shape.defaults")) do entries[name] = d end
  end
  for name, d in pairs(o.destinations or {}) do
    if type(name) ~= "string" then config.raise("shape: field 'destinations': keys must be site names") end
    entries[name] = d
  end
  local names = {}
  for name in pairs(entries) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local where = "shape: destinations[" .. name .. "]"
    local d = config.check(where, entries[name], DEST_SCHEMA)
    local entry = { name = name, limits = limits_of(where, d), rules = check_rules(d.rules, where .. ": field 'rules'"),
      mx = {} }
    for _, m in ipairs(d.mx or {}) do entry.mx[#entry.mx + 1] = m:lower():gsub("^%*?%.", "") end
    for _, dom in ipairs(d.domains or {}) do
      -- keyed by the A-labels: "bücher.example" and "xn--bcher-kva.example"
      -- are one domain, in the policy and in the address (as in route.smtp)
      local k, why = dns.to_ascii(dom)
      if not k then config.raise(string.format("%s: field 'domains': not a domain: %q (%s)", where, dom, why)) end
      if spec.by_domain[k] then
        config.raise(string.format("%s: domain %s is already in destination %s", where, k, spec.by_domain[k].name))
      end
      spec.by_domain[k] = entry
    end
    if not d.domains and not d.mx then config.raise(where .. ": give 'domains', 'mx' or both") end
    spec.destinations[#spec.destinations + 1] = entry
  end
  for _, kind in ipairs({ "tenants", "sources" }) do
    for k, v in pairs(o[kind] or {}) do
      local where = "shape: " .. kind .. "[" .. tostring(k) .. "]"
      if type(k) ~= "string" then config.raise("shape: field '" .. kind .. "': keys must be names") end
      local l = config.check(where, v, LIMITS_SCHEMA)
      if l.max_messages_per_connection then
        config.raise(where .. ": field 'max_messages_per_connection' is per destination")
      end
      spec[kind][k] = limits_of(where, l)
    end
  end
  spec.rules = check_rules(o.rules, "shape: field 'rules'")
  local shaper = shape.new(spec)
  local block = { name = "shape", spec = spec, shaper = shaper }
  function block.attach(_, mta)
    if mta.shaper then config.raise("shape: the policy uses two shape blocks; merge them into one") end
    local tnames = {}
    for name in pairs(spec.tenants) do tnames[#tnames + 1] = name end
    mta.tenants:check_names("shape: field 'tenants'", tnames)
    mta.shaper = shaper
  end
  -- state() -> per gate: inflight, parked, suspended_for, slowed_for, stats
  function block.state() return shaper:state() end
  -- A policy reload: suspensions, slow-downs and bounce periods the remote
  -- replies set carry over, with the tokens of rates that did not change.
  function block.handover(_, old)
    if old.shaper then shaper:inherit(old.shaper) end
    return true
  end
  return block
end

-- load(path) -> block: a shaping file is Lua returning the table setup() takes.
function _M.load(path)
  local fn, err = loadfile(path)
  if not fn then config.raise("shape.load: " .. tostring(err)) end
  local ok, t = pcall(fn)
  if not ok then config.raise("shape.load: " .. path .. ": " .. tostring(t)) end
  if type(t) ~= "table" then config.raise("shape.load: " .. path .. " must return a table, got " .. type(t)) end
  return _M.setup(t)
end

return _M
