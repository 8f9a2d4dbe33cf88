-- Tenants: their declared settings, and the inbound budgets kept per tenant
-- (connections, a message rate). docs/tenants.md describes them.
--
--   local tenants = require "moonpost.runtime.tenants"
--   local cfg = tenants.check(opts.tenants)   -- at load; raises config errors
--   local t = tenants.new(cfg)
--   t:get(name)             -> settings | nil (nil: not declared)
--   t:open(name [, force])  -> true | false   a connection of that tenant starts (false: at max_connections)
--   t:close(name)                              and ends
--   t:connections(name)     -> n
--   t:take(name)            -> true | false   one message from the rate budget (false: over max_messages)
--   t:give(name)                               a token taken for a message that turned out not to be name's
--   t:inherit(old)                             a reload: share old's counts and buckets
--   t:check_names(where, names)                 at a block's attach: raises a config error for a name in
--                                               the list that is not declared (when tenants are declared)
--
-- Settings of a tenant live in TENANT_SCHEMA below; blocks that give
-- tenants more settings add their fields there.
local uv = require "luv"
local config = require "moonpost.runtime.config"
local bucket = require "moonpost.runtime.bucket"

local format, type, pairs, ipairs, next, tostring = string.format, type, pairs, ipairs, next, tostring

local _M = { _VERSION = "0.1" }

-- Tenant names go into queue keys ("<tenant>@<domain>"), headers and logs.
_M.NAME_PATTERN = "^[%w_][%w_%.%-]*$"
_M.NAME_MAX = 64

-- rate("100/s") -> { count, per (seconds) } | nil (runtime/config.lua)
_M.rate = config.rate

local RATE_SCHEMA = {
  rate = { type = "string", required = true },
  burst = { type = "number", check = function(v) return v >= 1, "must be at least 1" end },
}

local function check_rate(where, v)
  local burst
  if type(v) == "table" then
    local o = config.check(where, v, RATE_SCHEMA)
    v, burst = o.rate, o.burst
  end
  local r = _M.rate(v)
  if not r then
    config.raise(format("%s: expected a rate like \"100/s\", \"6000/m\", \"50000/h\" or { rate = ..., burst = n }, "
      .. "got %s", where, type(v) == "string" and format("%q", v) or type(v)))
  end
  -- the bucket holds one period's worth unless told otherwise
  r.burst = burst or r.count
  return r
end

local TENANT_SCHEMA = {
  max_queued = { type = "posint" },
  max_connections = { type = "posint" },
  max_messages = { type = "any" },
}
_M.TENANT_SCHEMA = TENANT_SCHEMA

-- check(v) -> { [name] = settings }. Raises at the policy's line.
function _M.check(v)
  local out = {}
  if v == nil then return out end
  if type(v) ~= "table" then
    config.raise("moonpost.new: field 'tenants': expected a table of name = { settings }, got " .. type(v))
  end
  for name, t in pairs(v) do
    if type(name) ~= "string" or not name:match(_M.NAME_PATTERN) or #name > _M.NAME_MAX then
      config.raise(format("moonpost.new: field 'tenants': bad tenant name %s (letters, digits, '_', '.', '-'; "
        .. "at most %d; not starting with '.' or '-')", type(name) == "string" and format("%q", name) or tostring(name),
        _M.NAME_MAX))
    end
    local where = format("moonpost.new: tenants[%q]", name)
    local o = config.check(where, t, TENANT_SCHEMA)
    if o.max_messages ~= nil then o.max_messages = check_rate(where .. ": field 'max_messages'", o.max_messages) end
    o.name = name
    out[name] = o
  end
  return out
end

local Tenants = {}
local tenants_mt = { __index = Tenants }

function _M.new(cfg)
  return setmetatable({ cfg = cfg or {}, conns = {}, buckets = {} }, tenants_mt)
end

-- inherit(old): a reloaded policy's tenants count the same connections and
-- draw on the same rate buckets as the ones before (shared, so sessions
-- begun under the old policy still count until they end).
function Tenants:inherit(old)
  self.conns, self.buckets = old.conns, old.buckets
end

function Tenants:get(name)
  if name == nil then return nil end
  return self.cfg[name]
end

-- names() -> sorted list of declared tenants
function Tenants:names()
  local list = {}
  for name in pairs(self.cfg) do list[#list + 1] = name end
  table.sort(list)
  return list
end

-- check_names(where, names): a block naming tenants (shape, route, dkim)
-- must name declared ones; a typo would silently leave the tenant out.
-- Raised at the policy's line, naming the field (where). An MTA that
-- declares no tenants is not checked: its blocks name tenants that
-- handlers set (txn.tenant).
function Tenants:check_names(where, names)
  if next(self.cfg) == nil then return end
  local list = {}
  for _, name in ipairs(names) do list[#list + 1] = tostring(name) end
  table.sort(list)
  for _, name in ipairs(list) do
    if not self.cfg[name] then
      config.raise(format("%s: tenant '%s' is not declared in moonpost.new { tenants = ... } (declared: %s)",
        where, name, table.concat(self:names(), ", ")))
    end
  end
end

function Tenants:connections(name)
  return self.conns[name] or 0
end

-- open(name [, force]) -> true, counted | false (at max_connections). A
-- tenant that is not declared has no limit and is counted all the same.
-- force counts the connection even at the limit.
function Tenants:open(name, force)
  local n = self.conns[name] or 0
  local c = self.cfg[name]
  if not force and c and c.max_connections and n >= c.max_connections then return false end
  self.conns[name] = n + 1
  return true
end

function Tenants:close(name)
  local n = self.conns[name]
  if n then
    if n <= 1 then self.conns[name] = nil else self.conns[name] = n - 1 end
  end
end

-- take(name) -> true (a token taken, or no limit) | false (bucket empty).
-- A token bucket per tenant: `burst` tokens at most, refilled at
-- count/per tokens a second, on the loop's clock.
function Tenants:take(name)
  local c = self.cfg[name]
  local r = c and c.max_messages
  if not r then return true end
  local now = uv.now() / 1000
  local b = self.buckets[name]
  if not b then
    b = bucket.new(r.count / r.per, r.burst, now)
    self.buckets[name] = b
  end
  local tokens = bucket.refill(b, now)
  -- buckets outlive a policy reload: a changed rate applies from now on
  b.r = r.count / r.per
  if b.cap ~= r.burst then
    b.cap = r.burst
    if tokens > b.cap then b.tokens = b.cap end
  end
  if b.tokens < 1 then return false end
  b.tokens = b.tokens - 1
  return true
end

-- give(name): the token take(name) took goes back (the message was not
-- name's after all: a tenant header named another tenant). At most burst.
function Tenants:give(name)
  local b = self.buckets[name]
  if b then
    local tok = b.tokens + 1
    b.tokens = tok > b.cap and b.cap or tok
  end
end

return _M
